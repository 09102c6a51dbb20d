"""The signed round manifest: what the coordinator signs is what every node gets back, and
nothing else is taken: another key, another session or round, a changed byte, an oversized
or malformed blob, or content out of bounds is refused with a message naming what was wrong."""

from __future__ import annotations

import gc
import hashlib
import random
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from lightning_drift.auth import Identity
from lightning_drift.dataplane.manifest import (
    DEFAULT_LIMITS,
    DOMAIN,
    INPUTS_DOMAIN,
    Commit,
    Contributor,
    Limits,
    Manifest,
    ShardEntry,
    Signed,
    check,
    check_commit,
    inputs_digest,
    inputs_digests,
    piece_hash,
    sign,
    verify,
)
from lightning_drift.errors import AuthError, ProtocolError
from lightning_drift.text import short_id

SESSION = "5e55104d0c0ffee0"
SHARDS = 4
NODES = [hashlib.sha256(f"node-{i}".encode()).hexdigest() for i in range(3)]
COORD = Identity.generate()


def reduction(j: int) -> list[tuple[str, float, str]]:
    """Shard ``j``'s reduction list in :func:`make_manifest`'s round: (node, weight, piece)."""
    return [
        (node, float(10 * (i + 1)), piece_hash(f"{i}/{j}".encode())) for i, node in enumerate(NODES)
    ]


def make_manifest(**changes: Any) -> Manifest:
    """A valid manifest of round 7: three contributors weighing 60 in all, four shards, each
    shard's aggregators two of the nodes."""
    m = Manifest(
        session=SESSION,
        round=7,
        epoch=1,
        base=piece_hash(b"base weights"),
        plan=piece_hash(b"int8/64 x4 model"),
        contributors=3,
        weight=60.0,
        shards=[
            ShardEntry(
                index=j,
                primary=NODES[j % 3],
                mirror=NODES[(j + 1) % 3],
                result=piece_hash(f"result {j}".encode()),
                size=1000 + j,
                inputs=inputs_digest(reduction(j)),
            )
            for j in range(SHARDS)
        ],
        struck=[],
        unchanged="",
    )
    return msgspec.structs.replace(m, **changes)


def signed_anyway(m: Manifest, identity: Identity = COORD) -> bytes:
    """The coordinator's signature over ``m`` without :func:`sign`'s check: what a broken
    coordinator would hand out, so that the verifier's own checks are what is tested."""
    return signed_body(msgspec.msgpack.encode(m), identity)


def signed_body(body: bytes, identity: Identity = COORD) -> bytes:
    return msgspec.msgpack.encode(Signed(body=body, sig=identity.sign(DOMAIN + body)))


def replace_shard(j: int, **changes: Any) -> Callable[[Manifest], Manifest]:
    def change(m: Manifest) -> Manifest:
        ss = list(m.shards)
        ss[j] = msgspec.structs.replace(ss[j], **changes)
        return msgspec.structs.replace(m, shards=ss)

    return change


def fields(**changes: Any) -> Callable[[Manifest], Manifest]:
    return lambda m: msgspec.structs.replace(m, **changes)


# ---- the good path ---------------------------------------------------------------------------


def test_round_trip_gives_back_the_signed_manifest() -> None:
    m = make_manifest()
    got = verify(sign(m, COORD), COORD.public_key, session=SESSION, open_round=7)
    assert got == m
    assert got.result_hashes() == [piece_hash(f"result {j}".encode()) for j in range(SHARDS)]
    assert got.contributors == 3 and got.weight == 60.0
    assert [s.inputs for s in got.shards] == [inputs_digest(reduction(j)) for j in range(SHARDS)]


def test_round_is_not_checked_when_not_given() -> None:
    m = make_manifest(round=12)
    assert verify(sign(m, COORD), COORD.public_key, session=SESSION).round == 12


def test_an_unchanged_round_needs_no_results() -> None:
    m = make_manifest(unchanged="every aggregator of shard 2 lied", struck=[NODES[2]])
    m = replace_shard(2, result="", size=0, inputs="")(m)
    got = verify(sign(m, COORD), COORD.public_key, session=SESSION, open_round=7)
    assert got.unchanged == "every aggregator of shard 2 lied"
    assert got.result_hashes()[2] == "" and got.shards[2].inputs == ""
    assert got.struck == [NODES[2]]
    # What the books sign for an unchanged round: no upload counted, nothing to fetch.
    bare = make_manifest(unchanged="no samples trained this round", contributors=0, weight=0.0)
    bare = msgspec.structs.replace(bare, shards=[])
    assert verify(sign(bare, COORD), COORD.public_key, session=SESSION) == bare


def test_piece_hash_is_sha256_hex() -> None:
    assert piece_hash(b"piece") == hashlib.sha256(b"piece").hexdigest()
    assert piece_hash(memoryview(b"piece")) == piece_hash(bytearray(b"piece"))


# ---- the inputs digest: what a shard reduced ------------------------------------------------


def test_inputs_digest_is_the_documented_encoding() -> None:
    """sha256 of the domain and msgpack [[node, weight as float64, sha], ...]: written out by
    hand here, so the encoding every side computes cannot drift unnoticed."""
    node, sha = NODES[0], piece_hash(b"piece")
    by_hand = (
        b"\x91\x93"  # an array of one triple
        + b"\xd9\x40" + node.encode()  # str8 of 64
        + b"\xcb" + struct.pack(">d", 12.5)  # float64, big-endian
        + b"\xd9\x40" + sha.encode()
    )  # fmt: skip
    want = hashlib.sha256(INPUTS_DOMAIN + by_hand).hexdigest()
    assert inputs_digest([(node, 12.5, sha)]) == want
    assert inputs_digest([]) == hashlib.sha256(INPUTS_DOMAIN + b"\x90").hexdigest()


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 300, 65535, 65536])
def test_inputs_digests_of_many_shards_are_each_shards_inputs_digest(count: int) -> None:
    """The coordinator's way to name every shard at once gives the same digests, whatever
    the length of the reduction list (msgpack writes its header three ways)."""
    nodes = [f"{i:064x}" for i in range(count)]
    weights = [float(i % 7) + 0.5 for i in range(count)]
    pieces = [[piece_hash(f"{i} {j}".encode()) for i in range(count)] for j in range(2)]
    if count < 20:
        weights[-1:] = [3] if count else []  # an int weight is the float it equals
    want = [inputs_digest(list(zip(nodes, weights, p, strict=True))) for p in pieces]
    assert inputs_digests(nodes, weights, pieces) == want
    assert inputs_digests(nodes, weights, []) == []


def test_inputs_digests_want_a_weight_and_a_piece_per_node() -> None:
    with pytest.raises(ValueError, match="one weight and one piece per node"):
        inputs_digests(NODES, [1.0, 2.0, 3.0], [[piece_hash(b"a")] * 2])
    with pytest.raises(ValueError, match="one weight and one piece per node"):
        inputs_digests(NODES, [1.0, 2.0], [[piece_hash(b"a")] * 3])


def test_equal_lists_give_equal_digests() -> None:
    a = reduction(2)
    b = [(str(n), float(w), str(h)) for n, w, h in reduction(2)]  # built anew, not the same
    assert a is not b and inputs_digest(a) == inputs_digest(b)
    assert inputs_digest(tuple(a)) == inputs_digest(a)
    ints = [(n, int(w), h) for n, w, h in a]  # a weight of 10 is the weight 10.0
    assert inputs_digest(ints) == inputs_digest(a)
    assert len({inputs_digest(reduction(j)) for j in range(SHARDS)}) == SHARDS


def test_the_order_of_the_reduction_matters() -> None:
    a = reduction(0)
    digests = {
        inputs_digest(a),
        inputs_digest([a[1], a[0], a[2]]),
        inputs_digest([a[0], a[2], a[1]]),
        inputs_digest(list(reversed(a))),
    }
    assert len(digests) == 4
    assert inputs_digest(a[:2]) != inputs_digest(a)  # one contributor fewer


def test_every_bit_of_every_weight_matters() -> None:
    a = reduction(1)
    seen = {inputs_digest(a)}
    for i in range(len(a)):
        (bits,) = struct.unpack(">Q", struct.pack(">d", a[i][1]))
        for bit in range(64):
            (w,) = struct.unpack(">d", struct.pack(">Q", bits ^ (1 << bit)))
            changed = list(a)
            changed[i] = (a[i][0], w, a[i][2])
            seen.add(inputs_digest(changed))
    assert len(seen) == 1 + 64 * len(a)  # NaN patterns included: every one is its own


def test_the_fields_cannot_run_into_each_other() -> None:
    """A node id and a piece hash are length-prefixed: moving a character from one field
    to the next, or a piece to another node, gives another digest."""
    n, h = NODES[0], piece_hash(b"p")
    assert inputs_digest([(n, 1.0, h)]) != inputs_digest([(n[:-1], 1.0, n[-1] + h)])
    assert inputs_digest([(n, 1.0, h), (NODES[1], 2.0, h)]) != inputs_digest(
        [(n, 1.0, h), (NODES[1], 2.0, piece_hash(b"q"))]
    )
    assert inputs_digest([(n, 1.0, h)]) != piece_hash(msgspec.msgpack.encode([[n, 1.0, h]]))


def test_signing_is_deterministic() -> None:
    a = sign(make_manifest(), COORD)
    b = sign(make_manifest(), COORD)
    assert a == b
    again = sign(verify(a, COORD.public_key, session=SESSION), COORD)
    assert again == a
    assert sign(make_manifest(epoch=2), COORD) != a


def test_signature_covers_the_domain_prefix() -> None:
    """A signature over the bare body (the same key signing something that is not a
    manifest) is not a manifest signature."""
    body = msgspec.msgpack.encode(make_manifest())
    blob = msgspec.msgpack.encode(Signed(body=body, sig=COORD.sign(body)))
    with pytest.raises(AuthError, match="not signed by the coordinator"):
        verify(blob, COORD.public_key, session=SESSION)


def test_max_blob_holds_a_manifest_at_every_limit() -> None:
    limits = Limits(max_nodes=20, max_shards=12, max_session=6, max_reason=10)
    big = Manifest(
        session="\U0001f600" * limits.max_session,
        round=2**63 - 1,
        epoch=2**63 - 1,
        base="a" * 64,
        plan="b" * 64,
        contributors=limits.max_nodes,
        weight=1e308,
        shards=[
            ShardEntry(
                index=j,
                primary="d" * 64,
                mirror="e" * 64,
                result="f" * 64,
                size=limits.max_piece,
                inputs="c" * 64,
            )
            for j in range(limits.max_shards)
        ],
        struck=[f"{i:064x}" for i in range(limits.max_nodes)],
        unchanged="\U0001f600" * limits.max_reason,
    )
    blob = sign(big, COORD, limits=limits)
    assert len(blob) <= limits.max_blob
    assert verify(blob, COORD.public_key, session=big.session, limits=limits) == big


def test_max_blob_grows_with_nodes_only_by_the_struck_ids() -> None:
    """The contributors are a count: more nodes add room for struck node ids, nothing else."""
    assert Limits(max_nodes=2048).max_blob - Limits(max_nodes=1024).max_blob == 1024 * 66
    assert Limits(max_shards=32).max_blob - Limits(max_shards=16).max_blob < 16 * 440


def test_a_round_of_1024_contributors_and_16_shards_signs_to_a_few_kb() -> None:
    """The manifest goes to every member every round: its size must not grow with the
    contributors (1,024 of them once made it over a megabyte)."""
    members = [hashlib.sha256(f"member-{i}".encode()).hexdigest() for i in range(1024)]
    shards = 16
    weights = [float(100 + i) for i in range(len(members))]
    m = Manifest(
        session=SESSION,
        round=2**40,
        epoch=2**20,
        base=piece_hash(b"base"),
        plan=piece_hash(b"plan"),
        contributors=len(members),
        weight=sum(weights),
        shards=[
            ShardEntry(
                index=j,
                primary=members[2 * j],
                mirror=members[2 * j + 1],
                result=piece_hash(f"result {j}".encode()),
                size=2_500_000,
                inputs=inputs_digest(
                    [
                        (n, w, piece_hash(f"{n}/{j}".encode()))
                        for n, w in zip(members, weights, strict=True)
                    ]
                ),
            )
            for j in range(shards)
        ],
        struck=[],
        unchanged="",
    )
    blob = sign(m, COORD)
    assert len(blob) < 8 * 1024, len(blob)
    assert verify(blob, COORD.public_key, session=SESSION) == m


def test_limits_refuse_a_bound_below_one() -> None:
    with pytest.raises(ValueError, match="max_shards"):
        Limits(max_shards=0)


# ---- refused: signature and context -------------------------------------------------------------


def test_a_manifest_of_another_key_is_refused_naming_the_expected_one() -> None:
    other = Identity.generate()
    blob = sign(make_manifest(), other)
    with pytest.raises(AuthError, match=short_id(COORD.public_hex)) as err:
        verify(blob, COORD.public_key, session=SESSION)
    assert "not signed by the coordinator" in str(err.value)
    assert verify(blob, other.public_key, session=SESSION) == make_manifest()


def test_every_changed_byte_of_body_or_signature_is_refused() -> None:
    signed = msgspec.msgpack.decode(sign(make_manifest(), COORD), type=Signed)
    for i in range(len(signed.body)):
        body = bytearray(signed.body)
        body[i] ^= 0x01
        blob = msgspec.msgpack.encode(Signed(body=bytes(body), sig=signed.sig))
        with pytest.raises(AuthError, match="not signed by the coordinator"):
            verify(blob, COORD.public_key, session=SESSION)
    for i in range(len(signed.sig)):
        sig = bytearray(signed.sig)
        sig[i] ^= 0x80
        blob = msgspec.msgpack.encode(Signed(body=signed.body, sig=bytes(sig)))
        with pytest.raises(AuthError, match="not signed by the coordinator"):
            verify(blob, COORD.public_key, session=SESSION)


def test_every_changed_byte_of_the_blob_is_refused() -> None:
    blob = sign(make_manifest(), COORD)
    for i in range(len(blob)):
        for flip in (0x01, 0xFF):
            bad = bytearray(blob)
            bad[i] ^= flip
            with pytest.raises((AuthError, ProtocolError)):
                verify(bytes(bad), COORD.public_key, session=SESSION)


def test_a_signature_of_the_wrong_length_is_refused() -> None:
    body = msgspec.msgpack.encode(make_manifest())
    blob = msgspec.msgpack.encode(Signed(body=body, sig=COORD.sign(DOMAIN + body)[:63]))
    with pytest.raises(AuthError, match="63 bytes, expected 64"):
        verify(blob, COORD.public_key, session=SESSION)


def test_a_key_of_the_wrong_length_is_the_callers_error() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        verify(sign(make_manifest(), COORD), COORD.public_key[:31], session=SESSION)


def test_another_session_is_refused_as_a_replay() -> None:
    blob = sign(make_manifest(session="0ther5e55"), COORD)
    with pytest.raises(AuthError, match="session '0ther5e55', this is '5e55104d0c0ffee0'"):
        verify(blob, COORD.public_key, session=SESSION)


def test_another_round_is_refused_as_a_replay() -> None:
    blob = sign(make_manifest(round=6), COORD)
    with pytest.raises(AuthError, match="round 6, the open round is 7"):
        verify(blob, COORD.public_key, session=SESSION, open_round=7)


# ---- refused: size and form ----------------------------------------------------------------------


def test_an_oversized_blob_is_refused_before_decoding() -> None:
    limits = Limits(max_nodes=2, max_shards=2)
    garbage = b"\xc1" * (limits.max_blob + 1)  # 0xc1 is never valid msgpack
    with pytest.raises(ProtocolError, match=f"exceeds the {limits.max_blob}-byte bound"):
        verify(garbage, COORD.public_key, session=SESSION, limits=limits)
    with pytest.raises(ProtocolError, match="malformed manifest blob"):
        verify(garbage[: limits.max_blob], COORD.public_key, session=SESSION, limits=limits)


def test_a_genuine_blob_over_the_bound_is_refused_unread() -> None:
    blob = sign(make_manifest(), COORD)
    small = Limits(max_nodes=1, max_shards=1, max_session=1, max_reason=1)
    assert len(blob) > small.max_blob
    with pytest.raises(ProtocolError, match="Limits.max_blob"):
        verify(blob, COORD.public_key, session=SESSION, limits=small)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "malformed manifest blob"),
        (b"\x90", "malformed manifest blob"),  # an empty array
        (msgspec.msgpack.encode(["body", "sig"]), "malformed manifest blob"),
        (msgspec.msgpack.encode({"body": b"", "sig": b""}), "malformed manifest blob"),
        (sign(make_manifest(), COORD) + b"\x00", "malformed manifest blob"),
    ],
    ids=["empty", "short-array", "strings", "map", "trailing-byte"],
)
def test_a_malformed_envelope_is_refused(blob: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        verify(blob, COORD.public_key, session=SESSION)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode({"session": SESSION, "round": 7}),  # fields missing
        msgspec.msgpack.encode({**msgspec.to_builtins(make_manifest()), "round": "7"}),
        msgspec.msgpack.encode({**msgspec.to_builtins(make_manifest()), "round": True}),
        msgspec.msgpack.encode({**msgspec.to_builtins(make_manifest()), "contributors": []}),
        msgspec.msgpack.encode({**msgspec.to_builtins(make_manifest()), "weight": "60"}),
        msgspec.msgpack.encode(
            {
                **msgspec.to_builtins(make_manifest()),
                "shards": [
                    {k: v for k, v in msgspec.to_builtins(s).items() if k != "inputs"}
                    for s in make_manifest().shards
                ],
            }
        ),
    ],
    ids=[
        "empty",
        "invalid",
        "array",
        "missing",
        "round-str",
        "round-bool",
        "contributors-list",
        "weight-str",
        "inputs-missing",
    ],
)
def test_a_signed_body_that_is_not_a_manifest_is_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="the signed body is not a manifest"):
        verify(signed_body(body), COORD.public_key, session=SESSION)


def test_unknown_fields_in_the_body_are_ignored() -> None:
    """A newer coordinator may add fields (with defaults); an older node reads the rest."""
    d = {**msgspec.to_builtins(make_manifest()), "later": [1, 2]}
    got = verify(signed_body(msgspec.msgpack.encode(d)), COORD.public_key, session=SESSION)
    assert got == make_manifest()


# ---- refused: content out of bounds or inconsistent --------------------------------------------

TIGHT = Limits(max_nodes=3, max_shards=4, max_piece=5000, max_session=20, max_reason=40)
NOT_HEX = [
    ("short", "ab" * 31),
    ("upper", "AB" * 32),
    ("non-hex", "g" * 64),
    ("newline", "a" * 63 + "\n"),
    ("empty", ""),
]
EXTRA = hashlib.sha256(b"node-3").hexdigest()

CASES: list[tuple[str, Callable[[Manifest], Manifest], str]] = [
    ("session-empty", fields(session=""), "session must be 1"),
    ("session-long", fields(session="s" * 21), "Limits.max_session"),
    ("round-negative", fields(round=-1), "round is -1"),
    ("epoch-negative", fields(epoch=-2), "epoch is -2"),
    *[(f"base-{n}", fields(base=v), "base must be") for n, v in NOT_HEX],
    *[(f"plan-{n}", fields(plan=v), "plan must be") for n, v in NOT_HEX],
    (
        "contributors-over",
        fields(contributors=4),
        "contributors is 4, not an integer 0 … 3 (Limits.max_nodes)",
    ),
    ("contributors-negative", fields(contributors=-1), "contributors is -1"),
    ("weight-nan", fields(weight=float("nan")), "weight is nan, not a finite number >= 0"),
    ("weight-inf", fields(weight=float("inf")), "weight is inf"),
    ("weight-negative", fields(weight=-0.5), "weight is -0.5"),
    (
        "shards-over",
        lambda m: msgspec.structs.replace(m, shards=[*m.shards, m.shards[0]]),
        "shards holds 5 entries, over the bound of 4 (Limits.max_shards)",
    ),
    ("struck-over", fields(struck=[*NODES, EXTRA]), "struck holds 4 entries"),
    ("unchanged-long", fields(unchanged="x" * 41), "unchanged must be text of at most 40"),
    (
        "index-swapped",
        lambda m: msgspec.structs.replace(m, shards=[m.shards[1], m.shards[0], *m.shards[2:]]),
        "shards[0].index is 1",
    ),
    ("index-repeated", replace_shard(3, index=2), "shards[3].index is 2"),
    *[
        (f"primary-{n}", replace_shard(1, primary=v), "shards[1].primary must be")
        for n, v in NOT_HEX
    ],
    *[
        (f"mirror-{n}", replace_shard(2, mirror=v), "shards[2].mirror must be")
        for n, v in NOT_HEX
        if v
    ],
    ("mirror-is-primary", replace_shard(1, mirror=NODES[1]), "shards[1].mirror is its primary"),
    *[(f"result-{n}", replace_shard(0, result=v), "shards[0].result must be") for n, v in NOT_HEX],
    ("size-negative", replace_shard(0, size=-1), "shards[0].size is -1"),
    ("size-over", replace_shard(3, size=5001), "shards[3].size is 5001, not an integer 0 … 5000"),
    *[(f"inputs-{n}", replace_shard(1, inputs=v), "shards[1].inputs must be") for n, v in NOT_HEX],
    ("struck-not-hex", fields(struck=["AB" * 32]), "struck[0] must be a node id"),
    ("struck-twice", fields(struck=[NODES[1], NODES[1]]), "struck[1]"),
    ("changed-no-shards", fields(shards=[]), "shards is empty"),
    ("changed-no-contributors", fields(contributors=0), "contributors is 0, but the round changes"),
    ("changed-zero-weight", fields(weight=0.0), "weight is 0: a change of nobody's weight"),
    (
        "unchanged-weight-of-nobody",
        fields(unchanged="nothing", contributors=0),
        "weight is 60.0, but no upload counted",
    ),
]


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_content_out_of_bounds_is_refused_naming_the_field(
    change: Callable[[Manifest], Manifest], message: str
) -> None:
    good = make_manifest()
    check(good, TIGHT)  # the case's change alone makes it wrong
    bad = change(good)
    blob = signed_anyway(bad)
    with pytest.raises(ProtocolError, match="manifest refused") as err:
        verify(blob, COORD.public_key, session=bad.session, limits=TIGHT)
    assert message in str(err.value)
    with pytest.raises(ProtocolError) as err:
        check(bad, TIGHT)
    assert message in str(err.value)
    with pytest.raises(ProtocolError):  # the coordinator never signs it
        sign(bad, COORD, limits=TIGHT)


def test_a_refusal_shows_hostile_text_cut_and_clean() -> None:
    bad = make_manifest(base="\x1b[31m" + "A" * 5000)
    with pytest.raises(ProtocolError) as err:
        check(bad)
    assert "\x1b" not in str(err.value)
    assert len(str(err.value)) < 400


def test_defaults_let_a_large_session_through() -> None:
    assert DEFAULT_LIMITS.max_nodes >= 64  # the coordinator's --max-nodes default
    assert DEFAULT_LIMITS.max_shards >= 256
    check(make_manifest())


# ---- fuzz: nothing but the two refusals ------------------------------------------------------


def test_random_and_truncated_blobs_raise_only_refusals() -> None:
    rng = random.Random(20240607)
    good = sign(make_manifest(), COORD)
    blobs: list[bytes] = [good[:n] for n in range(len(good))]  # every truncation
    for _ in range(200):
        blobs.append(rng.randbytes(rng.randrange(0, 600)))
    for _ in range(200):
        bad = bytearray(good)
        for _ in range(rng.randrange(1, 8)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        if bytes(bad) != good:
            blobs.append(bytes(bad))
    for _ in range(100):  # bytes cut out of, or put into, the middle
        i = rng.randrange(len(good))
        blobs.append(good[:i] + good[i + rng.randrange(1, 40) :])
        blobs.append(good[:i] + rng.randbytes(rng.randrange(1, 40)) + good[i:])
    for blob in blobs:
        with pytest.raises((ProtocolError, AuthError)):
            verify(blob, COORD.public_key, session=SESSION, open_round=7)


def test_signed_garbage_bodies_raise_only_refusals() -> None:
    """Past the signature the body is the coordinator's; even so, a body that is not a
    manifest is a ProtocolError, never a crash, and what is taken passes every check."""
    rng = random.Random(7)
    body = msgspec.msgpack.encode(make_manifest())
    outcomes: Counter[str] = Counter()
    for _ in range(300):
        bad = bytearray(body)
        for _ in range(rng.randrange(1, 6)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        if rng.random() < 0.3:
            bad = bad[: rng.randrange(len(bad))]
        try:
            got = verify(signed_body(bytes(bad)), COORD.public_key, session=SESSION, open_round=7)
        except ProtocolError:
            outcomes["protocol"] += 1
            continue
        except AuthError:  # the change hit the session or the round
            outcomes["auth"] += 1
            continue
        check(got)  # a byte changed inside a hash or a text can leave a valid manifest
        outcomes["taken"] += 1
    assert outcomes["protocol"] > 150, outcomes


# ---- commits -------------------------------------------------------------------------------------

BASE = piece_hash(b"base weights")
SIZES = [1000, 1000, 1000, 412]


def make_commit(**changes: Any) -> Commit:
    c = Commit(
        round=7,
        base=BASE,
        pieces=[piece_hash(f"piece {j}".encode()) for j in range(SHARDS)],
        sizes=list(SIZES),
    )
    return msgspec.structs.replace(c, **changes)


def test_a_good_commit_passes() -> None:
    check_commit(make_commit(), open_round=7, base=BASE, shards=SHARDS, sizes=SIZES)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(make_commit()), type=Commit)
    assert decoded == make_commit()


COMMIT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("round", {"round": 6}, "commit for round 6, the open round is 7"),
    ("base", {"base": piece_hash(b"old")}, "is not the open round's base weights"),
    ("pieces-fewer", {"pieces": [BASE] * 3}, "commit pieces holds 3 entries, the plan has 4"),
    ("pieces-more", {"pieces": [BASE] * 5}, "commit pieces holds 5 entries"),
    ("sizes-fewer", {"sizes": SIZES[:3]}, "commit sizes holds 3 entries"),
    ("hash-upper", {"pieces": [BASE, BASE.upper(), BASE, BASE]}, "commit pieces[1]"),
    ("hash-short", {"pieces": [BASE, BASE, BASE[:63], BASE]}, "commit pieces[2]"),
    ("hash-not-str", {"pieces": [BASE, BASE, BASE, 5]}, "commit pieces[3] is 5"),
    ("hash-space", {"pieces": [BASE, " " + BASE[1:], BASE, BASE]}, "commit pieces[1]"),
    ("hash-newline", {"pieces": [BASE, BASE, BASE, BASE[:63] + "\n"]}, "commit pieces[3]"),
    ("hash-not-ascii", {"pieces": [BASE[:63] + "\u0661", BASE, BASE, BASE]}, "commit pieces[0]"),
    ("hash-not-hex", {"pieces": [BASE, BASE, "g" * 64, BASE]}, "commit pieces[2]"),
    ("hash-spilled", {"pieces": [BASE[:63], BASE + "0", BASE, BASE]}, "commit pieces[0]"),
    ("hash-bytes", {"pieces": [BASE, BASE.encode(), BASE, BASE]}, "commit pieces[1]"),
    ("size-other", {"sizes": [1000, 999, 1000, 412]}, "commit sizes[1] is 999 bytes"),
    ("size-negative", {"sizes": [1000, 1000, 1000, -412]}, "commit sizes[3] is -412"),
    ("size-float", {"sizes": [1000, 1000.0, 1000, 412]}, "commit sizes[1] is 1000.0"),
]


@pytest.mark.parametrize(
    ("changes", "message"), [c[1:] for c in COMMIT_CASES], ids=[c[0] for c in COMMIT_CASES]
)
def test_a_bad_commit_is_refused_naming_what(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError) as err:
        check_commit(make_commit(**changes), open_round=7, base=BASE, shards=SHARDS, sizes=SIZES)
    assert message in str(err.value)


def test_a_size_of_true_is_not_one_byte() -> None:
    """True == 1 in Python, so a size list equal to the plan's is still looked at by type."""
    with pytest.raises(ProtocolError, match=r"commit sizes\[2\] is True"):
        check_commit(
            make_commit(sizes=[1, 1, True, 1]), open_round=7, base=BASE, shards=SHARDS,
            sizes=[1, 1, 1, 1],
        )  # fmt: skip


def test_commits_and_contributors_stay_out_of_the_garbage_collectors_lists() -> None:
    """A thousand of each live through every round: the collector need not scan them."""
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(make_commit()), type=Commit)
    contributor = Contributor(node=NODES[0], weight=1.0, pieces=list(decoded.pieces))
    assert not gc.is_tracked(make_commit()) and not gc.is_tracked(decoded)
    assert not gc.is_tracked(contributor)


def test_check_commit_wants_one_size_per_shard() -> None:
    with pytest.raises(ValueError, match="3 expected sizes for 4 shards"):
        check_commit(make_commit(), open_round=7, base=BASE, shards=SHARDS, sizes=SIZES[:3])
