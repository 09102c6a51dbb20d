"""The sharded data plane's plan: byte-balanced shards on codec-block boundaries, pieces that
cut and join an encoded change exactly, and bad pieces refused with a reason."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from dataplane_cases import local, model

from lightning_drift import codec
from lightning_drift.dataplane.plan import MAX_SHARDS, ShardPlan, span_bytes
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.modelspec import TensorSpec, table_of


def _payload(codec_name: str) -> bytes:
    sd = model()
    return codec.encode(codec.difference(local(sd, 0, 1), sd), codec_name).payload


@pytest.mark.parametrize("codec_name", codec.CODECS)
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 16])
def test_pieces_join_back_and_read_as_the_codec_decodes(codec_name: str, count: int) -> None:
    sd = model()
    plan = ShardPlan(table_of(sd), codec_name, count)
    payload = _payload(codec_name)
    pieces = plan.pieces(payload)
    assert [len(p) for p in pieces] == [s.size for s in plan.shards]
    assert plan.join(pieces) == payload  # the very bytes codec.encode wrote
    whole = plan.assemble([plan.read(j, p) for j, p in enumerate(pieces)])
    decoded = codec.decode(payload, sd)
    assert list(whole) == list(sd)
    for k in sd:
        assert whole[k].dtype == decoded[k].dtype and torch.equal(whole[k], decoded[k]), k


@pytest.mark.parametrize("codec_name", codec.CODECS)
@pytest.mark.parametrize("count", [1, 2, 3, 7, 16, 64])
def test_shards_cover_every_value_once_on_block_boundaries(codec_name: str, count: int) -> None:
    table = table_of(model())
    plan = ShardPlan(table, codec_name, count)
    seen: dict[str, list[tuple[int, int]]] = {}
    for shard in plan.shards:
        for s in shard.spans:
            seen.setdefault(s.name, []).append((s.start, s.stop))
            if s.floating:
                assert s.start % plan.block == 0
                assert s.stop % plan.block == 0 or s.stop == table[s.name].numel
            else:
                assert (s.start, s.stop) == (0, table[s.name].numel)  # buffers stay whole
    for name, spec in table.items():
        runs = seen[name]
        assert runs[0][0] == 0 and runs[-1][1] == spec.numel
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))  # no gap, no overlap


@pytest.mark.parametrize("count", [2, 3, 8, 16, 100])
def test_shards_are_byte_balanced_within_one_block(count: int) -> None:
    table = {f"t{i}": TensorSpec(torch.float32, (1000 + 37 * i, 3)) for i in range(9)}
    plan = ShardPlan(table, "int8", count)
    unit = plan.block + 4
    sizes = [s.size for s in plan.shards]
    assert sum(sizes) == plan.total
    # Each boundary lies within one block of its share of the bytes, so each shard does too.
    assert all(abs(size - plan.total / count) < unit for size in sizes)


def test_a_large_model_is_planned_without_a_loop_over_its_blocks() -> None:
    # A billion values, 15 million blocks: the cut is a division per tensor.
    table = {f"layer{i}.weight": TensorSpec(torch.float32, (8192, 8192)) for i in range(15)}
    plan = ShardPlan(table, "int8", 16)
    assert plan.total == sum(span_bytes(s, plan.spec) for sh in plan.shards for s in sh.spans)
    assert all(abs(s.size - plan.total / 16) < plan.block + 4 for s in plan.shards)


def test_the_digest_names_codec_count_block_and_model() -> None:
    table = table_of(model())
    base = ShardPlan(table, "int8", 4).digest
    assert ShardPlan(table, "int8", 4).digest == base
    assert ShardPlan(table, "bfloat16", 4).digest != base
    assert ShardPlan(table, "int8", 5).digest != base
    assert ShardPlan(table, "int8", 4, block=32).digest != base
    other = dict(table, extra=TensorSpec(torch.float32, (2,)))
    assert ShardPlan(other, "int8", 4).digest != base


@pytest.mark.parametrize(
    ("codec_name", "count", "match"),
    [
        ("float32", 4, "needs a codec"),
        ("int8", 0, "shard count"),
        ("int8", MAX_SHARDS + 1, "shard count"),
    ],
)
def test_a_plan_refuses_what_it_cannot_cut(codec_name: str, count: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ShardPlan(table_of(model()), codec_name, count)


def test_split_and_merge_are_inverse_for_state_keyed_by_name() -> None:
    sd = model()
    plan = ShardPlan(table_of(sd), "int8", 5)
    some = {k: v for k, v in sd.items() if v.is_floating_point() and k != "mask"}
    back = plan.merge(plan.split(some))
    assert list(back) == [k for k in sd if k in some]
    assert all(torch.equal(back[k], some[k]) for k in some)
    parts = plan.split(some)
    dropped = next(j for j, p in enumerate(parts) if any(k.startswith("emb.weight@") for k in p))
    parts[dropped] = {k: v for k, v in parts[dropped].items() if not k.startswith("emb.weight@")}
    if sum(1 for p in plan.split(some) if any(k.startswith("emb.weight@") for k in p)) > 1:
        with pytest.raises(SessionError, match="emb.weight"):
            plan.merge(parts)


def _int8_plan() -> tuple[ShardPlan, list[bytes]]:
    plan = ShardPlan(table_of(model()), "int8", 3)
    return plan, plan.pieces(_payload("int8"))


def _scale_at(plan: ShardPlan, index: int) -> int:
    """The byte offset of the first scale in piece ``index`` (after its first span's codes)."""
    first = next(s for s in plan.shards[index].spans if s.floating and s.numel)
    before = 0
    for s in plan.shards[index].spans:
        if s is first:
            return before + s.numel
        before += span_bytes(s, plan.spec)
    raise AssertionError


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b, at: b[:-1], "bytes; the plan's is"),
        (lambda b, at: b + b"\0", "bytes; the plan's is"),
        (lambda b, at: b[:at] + struct.pack("<f", math.nan) + b[at + 4 :], "finite and >= 0"),
        (lambda b, at: b[:at] + struct.pack("<f", math.inf) + b[at + 4 :], "finite and >= 0"),
        (lambda b, at: b[:at] + struct.pack("<f", -1.0) + b[at + 4 :], "finite and >= 0"),
    ],
)
def test_a_bad_int8_piece_is_refused_with_its_reason(damage, match: str) -> None:
    plan, pieces = _int8_plan()
    bad = damage(pieces[0], _scale_at(plan, 0))
    with pytest.raises(SessionError, match=match) as err:
        plan.read(0, bad)
    assert err.value.code == "bad_upload"
    with pytest.raises(SessionError):
        plan.join([bad, *pieces[1:]])


def test_a_bool_buffer_holding_other_bytes_is_refused() -> None:
    sd = {"w": torch.zeros(10), "keep": torch.tensor([True, False])}
    plan = ShardPlan(table_of(sd), "int8", 1)
    piece = plan.pieces(codec.encode(codec.difference(sd, sd), "int8").payload)[0]
    assert piece.endswith(b"\x01\x00")
    with pytest.raises(SessionError, match="bool buffer 'keep'"):
        plan.read(0, piece[:-2] + b"\x02\x00")


def test_a_non_finite_bfloat16_piece_is_refused() -> None:
    sd = {"w": torch.zeros(10)}
    plan = ShardPlan(table_of(sd), "bfloat16", 1)
    inf = torch.tensor([math.inf], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    with pytest.raises(SessionError, match="non-finite"):
        plan.read(0, inf + b"\0" * 18)


def test_a_payload_of_another_model_or_codec_is_not_cut() -> None:
    plan = ShardPlan(table_of(model()), "int8", 3)
    with pytest.raises(SessionError, match="a change of codec bfloat16, the plan's is int8/64"):
        plan.pieces(_payload("bfloat16"))
    with pytest.raises(SessionError, match="not a compact change"):
        plan.pieces(b"\x00" * 12)
    other = {"w": torch.zeros(7)}
    alien = codec.encode(codec.difference(other, other), "int8").payload
    with pytest.raises(SessionError, match=r"a compact int8/64 change of this model is \d+ bytes"):
        plan.pieces(alien)
    with pytest.raises(SessionError, match="shard 3 is not one"):
        plan.read(3, b"")


def test_random_bytes_never_raise_anything_but_a_bad_upload() -> None:
    plan, pieces = _int8_plan()
    g = torch.Generator().manual_seed(7)
    for trial in range(200):
        j = trial % plan.count
        n = plan.shards[j].size if trial % 2 else int(torch.randint(0, 300, (1,), generator=g))
        junk = bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
        try:
            out = plan.read(j, junk)
        except SessionError as exc:
            assert exc.code == "bad_upload"
        else:  # what reads is a change of the right shapes
            assert {k for k in out} == {s.key for s in plan.shards[j].spans}
