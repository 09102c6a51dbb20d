"""The drift/0 wire format: every message round-trips; every kind of bad frame is refused."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_drift import protocol as p
from lightning_drift.errors import ProtocolError

MESSAGE_TYPES: tuple[type, ...] = get_args(p.Message)  # every message class, in union order
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_INT = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_FLOAT = st.floats(allow_nan=False, allow_infinity=False)  # JSON has no NaN / inf


def strategy(tp: Any) -> st.SearchStrategy[Any]:
    """A hypothesis strategy for a field type of the protocol (built from the Struct hints)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is str:
        return st.text(max_size=40)
    if tp is bool:
        return st.booleans()
    if tp is bytes:
        return st.binary(max_size=40)
    if tp is int:
        return _INT
    if tp is float:
        return _FLOAT
    if tp is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (Union, types.UnionType):
        return st.one_of(*(strategy(a) for a in args))
    if origin is list:
        return st.lists(strategy(args[0]), max_size=3)
    if origin is tuple:
        return st.tuples(*(strategy(a) for a in args))
    if origin is dict:
        return st.dictionaries(strategy(args[0]), strategy(args[1]), max_size=3)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return struct_strategy(tp)
    raise AssertionError(f"no strategy for {tp!r}")


def struct_strategy(cls: type) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls, vars(p))
    fields = {f.name: strategy(hints[f.name]) for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **fields)


def test_the_union_holds_every_message_once() -> None:
    tags = [msgspec.inspect.type_info(t).tag for t in MESSAGE_TYPES]
    assert len(set(tags)) == len(tags) == 26
    assert all(issubclass(t, msgspec.Struct) for t in MESSAGE_TYPES)
    assert p.ALPN == b"drift/0" and p.MAX_FRAME == 1 << 20


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_every_message_round_trips(cls: type, data: st.DataObject) -> None:
    msg = data.draw(struct_strategy(cls))
    frame = p.encode_frame(msg)
    assert p.frame_length(frame[:4]) == len(frame) - 4
    assert p.decode_frame(frame) == msg
    assert p.decode(p.encode(msg)) == msg


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_protocol_error(body: bytes) -> None:
    try:
        msg = p.decode(body)
    except ProtocolError:
        return
    assert isinstance(msg, MESSAGE_TYPES)


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"hello", "malformed"),
        (b"{", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b"[]", "invalid message"),
        (b"null", "invalid message"),
        (b'{"session_id":"s","nonce":"n"}', "missing required field `type`"),
        (b'{"type":"nope"}', "Invalid value 'nope'"),
        (b'{"type":"ping","session_id":"s"}', "missing required field `nonce`"),
        (b'{"type":"ping","session_id":1,"nonce":"n"}', "Expected `str`, got `int`"),
        (b'{"type":"blob","size":"10","sha256":"x"}', "Expected `int`, got `str`"),
        (
            b'{"type":"train_config","session_id":"s","epochs":1,"batch_size":1,"sync_every":1,'
            b'"aggregation":"median"}',
            "aggregation",
        ),
        (b'{"type":"ping","session_id":"s","nonce":"n"} x', "trailing"),
    ],
)
def test_bad_bodies_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        p.decode(body)


def test_unknown_fields_are_ignored_and_defaults_fill_in() -> None:
    msg = p.decode(b'{"type":"barrier_sync","round":3,"added_in_v9":[1,2]}')
    assert msg == p.BarrierSync(round=3)
    assert (msg.samples, msg.delta, msg.loss) == (0, False, None)


def test_truncated_frames_are_refused() -> None:
    frame = p.encode_frame(p.Ping(session_id="session", nonce="nonce"))
    for cut in range(len(frame)):
        with pytest.raises(ProtocolError, match="truncated"):
            p.decode_frame(frame[:cut])


def test_trailing_junk_after_a_frame_is_refused() -> None:
    frame = p.encode_frame(p.Bye())
    with pytest.raises(ProtocolError, match="trailing junk: 1 bytes"):
        p.decode_frame(frame + b"x")


def test_oversized_length_prefix_is_refused_from_the_prefix_alone() -> None:
    assert p.frame_length(p.MAX_FRAME.to_bytes(4, "big")) == p.MAX_FRAME
    for n in (p.MAX_FRAME + 1, 2**31, 2**32 - 1):
        with pytest.raises(ProtocolError, match="exceeds the 1048576-byte limit"):
            p.frame_length(n.to_bytes(4, "big"))
        with pytest.raises(ProtocolError, match="exceeds"):
            p.decode_frame(n.to_bytes(4, "big"))  # no body needed to refuse it
    with pytest.raises(ProtocolError, match="empty frame"):
        p.frame_length(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="exceeds"):
        p.decode(b" " * (p.MAX_FRAME + 1))


def test_oversized_messages_are_not_sent() -> None:
    with pytest.raises(ProtocolError, match="send large data as a blob"):
        p.encode_frame(p.Error(code="x", message="m" * p.MAX_FRAME))


def test_expect() -> None:
    ping = p.Ping(session_id="s", nonce="n")
    assert p.expect(ping, p.Ping) is ping
    with pytest.raises(ProtocolError, match="expected Join, got Ping"):
        p.expect(ping, p.Join)
    with pytest.raises(ProtocolError, match="peer refused: auth: token expired"):
        p.expect(p.Error(code="auth", message="token expired"), p.Ping)
