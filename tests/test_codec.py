"""Compressed changes (lightning_drift.codec): round trips, error feedback, exact rebuilding and
the refusal of bad payloads. Pure: no I/O."""

from __future__ import annotations

import math

import pytest
import torch
from support import wire

from lightning_drift import codec
from lightning_drift.aggregate import to_bytes
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.modelspec import TensorSpec

B = codec.BLOCK


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(33, 17, generator=g),  # 561 values: the last block is short
        "b": torch.randn(B, generator=g),  # exactly one block
        "s": torch.tensor(0.5),  # a scalar
        "e": torch.zeros(0, 4),  # no values at all
        "d": torch.randn(7, generator=g, dtype=torch.float64),
        "h": torch.randn(9, generator=g).to(torch.bfloat16),
        "n": torch.tensor(3),  # an integer buffer: travels as its value
        "m": torch.tensor([True, False]),
    }


def change(
    like: dict[str, torch.Tensor], seed: int, scale: float = 1e-3
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in like.items():
        if v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=g, dtype=codec.compute_dtype(v.dtype)) * scale
        else:
            out[k] = v + 1 if v.dtype != torch.bool else ~v
    return out


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", codec.CODECS)
def test_decode_gives_back_exactly_what_encode_says_it_applied(name):
    like = model()
    enc = codec.encode(change(like, 1), name)
    got = codec.decode(enc.payload, like)
    assert got.keys() == like.keys()
    for k, v in got.items():
        assert v.dtype == enc.applied[k].dtype and torch.equal(v, enc.applied[k]), k
        if like[k].is_floating_point():
            assert v.dtype == codec.compute_dtype(like[k].dtype), k
    assert torch.equal(got["n"], torch.tensor(4)) and torch.equal(got["m"], ~like["m"])
    assert codec.encode(change(like, 1), name).payload == enc.payload  # deterministic


def test_bfloat16_carries_each_change_rounded_to_bfloat16():
    like = model()
    ch = change(like, 2)
    got = codec.decode(codec.encode(ch, "bfloat16").payload, like)
    for k, v in ch.items():
        if v.is_floating_point():
            assert torch.equal(got[k], v.to(torch.bfloat16).to(v.dtype)), k


@pytest.mark.parametrize("n", [*range(0, 2 * B + 2), 1000, 4097])
def test_int8_blocks_for_every_tail_length(n):
    # Every length up to two blocks and a bit: one scale per started block, every value
    # within half a step of its block's grid, codes in [-127, 127].
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-4, 1, max(n, 1))[:n]
    enc = codec.encode({"x": x}, "int8")
    raw = wire(enc.payload, {"x": x})
    codes, scales = raw["codes/x"], raw["scales/x"]
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (math.ceil(n / B),)
    assert int(codes.abs().max()) <= 127 if n else True
    err = (enc.applied["x"] - x).abs()
    for i in range(scales.numel()):
        block = slice(i * B, min(n, (i + 1) * B))
        assert float(err[block].max()) <= float(scales[i]) / 2 * (1 + 1e-6), i
        assert float(scales[i]) == pytest.approx(float(x[block].abs().max()) / 127, rel=1e-6)


def test_int8_decodes_every_code_as_code_times_scale():
    # Exhaustive over the 255 codes: decoding is one float32 multiply per value.
    codes = torch.arange(-127, 128, dtype=torch.int8)
    scale = torch.tensor([0.0123], dtype=torch.float32)
    x = codes.float() * scale  # what the decoding must give, bit for bit
    enc = codec.encode({"x": x[:B]}, "int8")
    got = codec.dequantize(codes, scale.expand(math.ceil(codes.numel() / B)).clone(), B)
    assert torch.equal(got, codes.to(torch.float32) * scale)
    assert torch.equal(enc.applied["x"], x[:B])  # a value on the grid comes back exactly


def test_a_block_of_zeros_has_scale_zero_and_comes_back_zero():
    enc = codec.encode({"x": torch.zeros(2 * B + 3)}, "int8")
    raw = wire(enc.payload, {"x": torch.zeros(2 * B + 3)})
    assert torch.equal(raw["scales/x"], torch.zeros(3))
    assert torch.equal(enc.applied["x"], torch.zeros(2 * B + 3))


def test_int8_costs_one_byte_and_a_scale_per_block():
    x = {"x": torch.randn(1 << 16)}
    size = len(codec.encode(x, "int8").payload)
    values = (1 << 16) + 4 * ((1 << 16) // B)
    assert values <= size <= values + 256  # plus the safetensors header
    assert codec.nbytes(1 << 16, "int8") == pytest.approx(1 + 4 / B)
    assert len(codec.encode(x, "bfloat16").payload) <= 2 * (1 << 16) + 256


# -- error feedback -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", codec.CODECS)
def test_error_feedback_loses_nothing_over_many_rounds(name):
    # After every round: sum of applied changes + residual == sum of true changes, up to the
    # float32 rounding of one addition (change + residual) and one subtraction (what was
    # applied) per round. Without error feedback
    # the same rounds lose orders of magnitude more.
    like = {"w": torch.zeros(40, 50), "d": torch.zeros(70, dtype=torch.float64)}
    rounds = 300
    residual = codec.Residual()
    true = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in like.items()}
    sent = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in like.items()}
    lost = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in like.items()}
    bound = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in like.items()}
    for r in range(rounds):
        # Changes of very different sizes from round to round and within a tensor.
        ch = change(like, 100 + r, scale=10.0 ** (-2 - (r % 5)))
        before = {
            k: (residual.get(k) if residual.get(k) is not None else torch.zeros(1)) for k in ch
        }
        enc = codec.encode(ch, name, residual)
        applied = codec.decode(enc.payload, like)
        plain = codec.decode(codec.encode(ch, name).payload, like)  # no error feedback
        for k in like:
            true[k] += ch[k].double()
            sent[k] += applied[k].double()
            lost[k] += plain[k].double() - ch[k].double()
            s = (ch[k] + before[k].to(ch[k].dtype)).double()
            eps = 2.0**-24 if ch[k].dtype == torch.float32 else 2.0**-53
            # one add (change + residual) and one subtraction (what was applied), each
            # correctly rounded: the latter to within eps of its result
            bound[k] += (s.abs() * 2 + applied[k].double().abs()) * eps
        for k in like:
            res = residual.get(k).double()
            # (and the float64 rounding of this test's own bookkeeping)
            bound[k] += (sent[k].abs() + true[k].abs() + res.abs()) * 2.0**-51
            gap = (sent[k] + res - true[k]).abs()
            assert bool((gap <= bound[k] + 1e-300).all()), (r, k, float(gap.max()))
    for k in like:
        gap = (sent[k] + residual.get(k).double() - true[k]).abs().max()
        assert float(gap) * 1000 < float(lost[k].abs().max()), k


def test_the_residual_is_what_the_encoding_left_out():
    like = model()
    residual = codec.Residual()
    first = change(like, 5)
    enc = codec.encode(first, "int8", residual)
    for k, v in first.items():
        if v.is_floating_point():
            assert torch.equal(residual.get(k), v.to(codec.compute_dtype(v.dtype)) - enc.applied[k])
    second = change(like, 6)
    enc2 = codec.encode(second, "int8", residual)
    alone = codec.encode(second, "int8")  # the same change, no residual carried
    assert enc2.payload != alone.payload  # the carried residual went into the second change
    saved = residual.state_dict()
    again = codec.Residual()
    again.load_state_dict(saved)
    assert all(torch.equal(again.get(k), v) for k, v in saved.items())
    residual.clear()
    assert len(residual) == 0 and len(again) == len(saved)


# -- exact rebuilding ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", codec.CODECS)
def test_sender_and_receiver_rebuild_the_same_bits_over_many_rounds(name):
    # The coordinator applies its own encoded change (enc.applied) to its copy; a node applies
    # the decoded payload to its own copy: after 200 rounds both are the same bytes.
    coord = model(7)
    node = {k: v.clone() for k, v in coord.items()}
    residual = codec.Residual()
    for r in range(200):
        target = {
            k: (v.to(codec.compute_dtype(v.dtype)) + change(coord, r)[k]).to(v.dtype)
            if v.is_floating_point()
            else change(coord, r)[k]
            for k, v in coord.items()
        }
        enc = codec.encode(codec.difference(target, coord), name, residual)
        coord = codec.apply(coord, enc.applied)
        node = codec.apply(node, codec.decode(enc.payload, node))
        assert to_bytes(node) == to_bytes(coord), r


def test_difference_and_apply_are_inverse_for_exact_changes():
    old = model(3)
    new = codec.apply(old, change(old, 4))
    assert to_bytes(codec.apply(old, codec.difference(new, old))) == to_bytes(new)


# -- bad payloads -------------------------------------------------------------------------------


def _payload(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    import safetensors.torch

    return safetensors.torch.save(tensors, metadata=meta)


def _int8(like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return wire(codec.encode(change(like, 9), "int8").payload, like)


@pytest.mark.parametrize(
    ("mutate", "meta", "message"),
    [
        (lambda t: t.pop("codes/w"), {}, "missing 'codes/w' for tensor 'w'"),
        (
            lambda t: t.update({"codes/extra": torch.zeros(1, dtype=torch.int8)}),
            {},
            "not in the model",
        ),
        (
            lambda t: t.update({"codes/w": torch.zeros(3, dtype=torch.int8)}),
            {},
            "codes of 'w' are int8 (3,)",
        ),
        (lambda t: t.update({"codes/w": torch.zeros(33, 17)}), {}, "codes of 'w' are float32"),
        (lambda t: t.update({"scales/w": torch.ones(2)}), {}, "scales of 'w' are float32 (2,)"),
        (lambda t: t["scales/w"].__setitem__(0, float("nan")), {}, "must be finite and >= 0"),
        (lambda t: t["scales/w"].__setitem__(0, -1.0), {}, "must be finite and >= 0"),
        (lambda t: t.update({"values/n": torch.tensor(1.5)}), {}, "'n' is float32 ()"),
        (lambda t: None, {"drift_codec": "int8/3"}, "block size '3' is not in"),
        (lambda t: None, {"drift_codec": "int8/x"}, "block size 'x' is not in"),
        (lambda t: None, {"drift_codec": "int8"}, "block size '' is not in"),
        (lambda t: None, {"drift_codec": "zstd9"}, "unknown codec 'zstd9'"),
        (lambda t: None, {"drift_codec": "bfloat16/64"}, "takes no block size"),
    ],
)
def test_a_bad_int8_payload_is_refused_with_what_is_wrong(mutate, meta, message):
    like = model()
    tensors = _int8(like)
    mutate(tensors)
    payload = _payload(tensors, {"drift_codec": f"int8/{B}", **meta})
    with pytest.raises(SessionError, match="bad compressed change") as err:
        codec.decode(payload, like)
    assert err.value.code == "bad_upload"
    assert message in str(err.value)


def test_a_bad_bfloat16_payload_is_refused():
    like = {"w": torch.zeros(4)}
    bad = _payload(
        {"values/w": torch.tensor([1.0, float("inf"), 0, 0]).bfloat16()},
        {"drift_codec": "bfloat16"},
    )
    with pytest.raises(SessionError, match="'w' holds non-finite values"):
        codec.decode(bad, like)
    with pytest.raises(SessionError, match="not a valid safetensors change"):
        codec.decode(b"\x00\x01garbage", like)


def test_a_plain_safetensors_change_is_read_as_floating_changes():
    # Earlier bfloat16 deltas had no codec name: the tensors under their own names.
    like = {"w": torch.zeros(3), "n": torch.tensor(1)}
    got = codec.decode(to_bytes({"w": torch.ones(3).bfloat16(), "n": torch.tensor(2)}), like)
    assert torch.equal(got["w"], torch.ones(3)) and got["w"].dtype == torch.float32
    assert torch.equal(got["n"], torch.tensor(2))


def test_an_unknown_codec_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown codec 'int5'"):
        codec.encode({"w": torch.zeros(2)}, "int5")


@pytest.mark.parametrize("name", codec.CODECS)
def test_a_change_travels_compact_without_tensor_names(name):
    like = {f"layers.{i}.weight": v for i, v in enumerate(model().values())}
    ch = change(like, 5)
    enc = codec.encode(ch, name)
    table = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in like.items()}
    spec = codec.Spec.of(name)
    assert enc.payload.startswith(codec.COMPACT + bytes([len(str(spec))]) + str(spec).encode())
    assert len(enc.payload) == codec.compact_size(table, spec)
    assert b"layers" not in enc.payload  # no tensor names travel
    # The same tensors as safetensors decode to the same change, with their names' bytes more.
    legacy = _payload(wire(enc.payload, like), {codec.META_CODEC: str(spec)})
    assert len(legacy) > len(enc.payload) + 8 * len("layers.0.weight")
    want = codec.decode(legacy, like)
    for k, v in codec.decode(enc.payload, like).items():
        assert torch.equal(v, want[k]) and torch.equal(v, enc.applied[k]), k
    # A body of another size is another model: refused, naming both sizes.
    for bad in (enc.payload[:-1], enc.payload + b"\0"):
        with pytest.raises(SessionError, match=f"change of this model is {len(enc.payload)}"):
            codec.decode(bad, like)
    flipped = bytearray(enc.payload)
    flipped[-1] = 2  # the bool buffer last in name order ("layers.7.weight"): neither 0 nor 1
    with pytest.raises(SessionError, match="holds bytes other than 0 and 1"):
        codec.decode(bytes(flipped), like)
