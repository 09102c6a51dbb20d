"""The low-bit codecs (lightning_drift.blocks, through lightning_drift.codec): topk (which
values a block keeps and how), sign and int2 (the levels every value takes), their bytes, and
the refusal of codes no encoder writes. Pure: no I/O."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch
from support import wire

from lightning_drift import blocks, codec
from lightning_drift.errors import SessionError

B, K = blocks.TOPK_BLOCK, blocks.TOPK_KEEP


@pytest.mark.parametrize("n", [*range(0, 2 * B + 2), 1000, 4097])
def test_each_block_keeps_its_largest_values_at_one_of_two_levels(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g)
    codes, scales, got = blocks.topk_encode(x)
    nb = math.ceil(n / B)
    assert codes.dtype == torch.uint8 and codes.shape == (nb * K,)
    assert scales.dtype == torch.bfloat16 and scales.shape == (nb,)
    for j in range(nb):
        block, out = x[j * B : (j + 1) * B], got[j * B : (j + 1) * B]
        kept = out != 0
        assert int(kept.sum()) == min(K, len(block))
        # Every value kept is at least as large as every value left out, with its own sign.
        if bool(kept.any()) and not bool(kept.all()):
            assert float(block[kept].abs().min()) >= float(block[~kept].abs().max())
        assert bool((torch.sign(out[kept]) == torch.sign(block[kept])).all())
        s = float(scales[j])
        assert set(out[kept].abs().tolist()) <= {s, 2 * s}
        assert s == float(torch.tensor(float(block.abs().max()) / 2).to(torch.bfloat16))
    assert torch.equal(blocks.topk_decode(codes, scales, B, n), got)


def test_ties_go_to_the_lower_position_and_a_zero_block_sends_zeros():
    x = torch.zeros(2 * B)
    x[B + 3 : B + 3 + 2 * K] = 1.0  # 2K equal values in the second block
    codes, scales, got = blocks.topk_encode(x)
    assert torch.equal(got[:B], torch.zeros(B)) and float(scales[0]) == 0.0
    assert torch.equal(codes[:K], torch.arange(K, dtype=torch.uint8))  # positions 0..K-1
    assert torch.nonzero(got).flatten().tolist() == list(range(B + 3, B + 3 + K))


def test_the_error_left_out_shrinks_when_the_residual_is_sent_on():
    # Error feedback: the same change sent over rounds with its residual arrives in full, where
    # one encoding alone carries only a few per cent of it.
    g = torch.Generator().manual_seed(1)
    x = {"w": torch.randn(64, 64, generator=g)}
    residual = codec.Residual()
    sent = torch.zeros(64, 64)
    first = codec.encode(x, "topk", residual).applied["w"]
    sent += first
    for _ in range(200):
        sent += codec.encode({"w": torch.zeros(64, 64)}, "topk", residual).applied["w"]
    assert float((first - x["w"]).norm()) > 0.7 * float(x["w"].norm())
    assert float((sent - x["w"]).norm()) < 0.05 * float(x["w"].norm())
    assert torch.allclose(sent + residual.get("w"), x["w"], atol=1e-5)


def test_topk_payloads_are_a_few_per_cent_of_float32():
    n = 1 << 16
    x = {"w": torch.randn(n)}
    size = len(codec.encode(x, "topk").payload)
    assert codec.nbytes(n, "topk") == pytest.approx((K + 2) / B)
    assert size < n * (K + 2) / B + 300  # the safetensors header
    assert size < 0.03 * 4 * n


def _topk(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return wire(codec.encode({"w": x}, "topk").payload, {"w": x})


def _refused(tensors: dict[str, torch.Tensor], like: dict[str, torch.Tensor], meta: str) -> str:
    payload = safetensors.torch.save(tensors, metadata={"drift_codec": meta})
    with pytest.raises(SessionError, match="bad compressed change") as err:
        codec.decode(payload, like)
    assert err.value.code == "bad_upload"
    return str(err.value)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t["codes/w"].__setitem__(1, t["codes/w"][0]), "keeps a position twice"),
        (lambda t: t.update({"codes/w": torch.zeros(3, dtype=torch.uint8)}), "codes of 'w'"),
        (lambda t: t.update({"codes/w": t["codes/w"].to(torch.int8)}), "codes of 'w' are int8"),
        (lambda t: t["scales/w"].__setitem__(0, float("inf")), "must be finite and >= 0"),
        (lambda t: t["scales/w"].__setitem__(1, -1.0), "must be finite and >= 0"),
        (lambda t: t.update({"scales/w": t["scales/w"].float()}), "scales of 'w' are float32"),
    ],
)
def test_a_bad_topk_payload_is_refused_with_what_is_wrong(mutate, message):
    x = torch.randn(3 * B + 5)
    tensors = _topk(x)
    mutate(tensors)
    assert message in _refused(tensors, {"w": x}, f"topk/{B}/{K}")


def test_a_position_outside_a_smaller_block_is_refused():
    x = torch.randn(40)
    codes, scales, _ = blocks.topk_encode(x, 16, 2)
    codes[0] = 16 | (1 << 6)  # position 16 of a block of 16 values
    tensors = {"codes/w": codes, "scales/w": scales}
    assert "outside its block of 16" in _refused(tensors, {"w": x}, "topk/16/2")


@pytest.mark.parametrize(
    "meta", ["topk", "topk/64", "topk/65/4", "topk/64/0", "topk/8/9", "topk/a/b"]
)
def test_a_topk_spec_out_of_bounds_is_refused(meta):
    x = torch.randn(100)
    assert "topk block and kept values" in _refused(_topk(x), {"w": x}, meta)


def test_another_block_and_keep_are_read_as_their_spec_says():
    # A payload names its parameters: a receiver decodes what the sender chose.
    x = torch.randn(100)
    codes, scales, got = blocks.topk_encode(x, 32, 8)
    payload = safetensors.torch.save(
        {"codes/w": codes, "scales/w": scales}, metadata={"drift_codec": "topk/32/8"}
    )
    assert torch.equal(codec.decode(payload, {"w": x})["w"], got)


@pytest.mark.parametrize("n", [*range(0, 2 * 64 + 2), 1000])
def test_sign_sends_every_value_as_its_blocks_mean_magnitude_with_its_sign(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g)
    codes, scales, got = blocks.sign_encode(x)
    nb = math.ceil(n / 64)
    assert codes.shape == (nb * 8,) and scales.shape == (nb,)
    for j in range(nb):
        block = x[j * 64 : (j + 1) * 64]
        s = float(torch.tensor(float(block.double().abs().mean())).to(torch.bfloat16))
        assert float(scales[j]) == s
        out = got[j * 64 : (j + 1) * 64]
        assert torch.equal(out, torch.where(block < 0, -s, s).to(torch.float32))
    assert torch.equal(blocks.sign_decode(codes, scales, 64, n), got)


@pytest.mark.parametrize("name", ["sign", "int2", "int3", "int4"])
def test_every_code_byte_decodes_and_a_bad_block_or_scale_is_refused(name):
    x = torch.randn(300)
    tensors = wire(codec.encode({"w": x}, name).payload, {"w": x})
    tensors["codes/w"] = torch.arange(tensors["codes/w"].numel(), dtype=torch.int64).to(
        torch.uint8
    )  # every byte value: all are codes
    payload = safetensors.torch.save(tensors, metadata={"drift_codec": f"{name}/64"})
    assert codec.decode(payload, {"w": x})["w"].shape == (300,)
    tensors["scales/w"][2] = float("nan")
    assert "must be finite and >= 0" in _refused(tensors, {"w": x}, f"{name}/64")
    for meta in (f"{name}/63", f"{name}/4", f"{name}", f"{name}/64/2"):
        assert "must be a power of two" in _refused(tensors, {"w": x}, meta)


def test_the_low_bit_codecs_cost_what_their_layout_says():
    n = 1 << 16
    x = {"w": torch.randn(n)}
    costs = {"sign": 8 + 2, "int2": 16 + 2, "int3": 24 + 2, "int4": 32 + 2}
    for name, per_value in ((k, v / 64) for k, v in costs.items()):
        assert codec.nbytes(n, name) == pytest.approx(per_value)
        assert len(codec.encode(x, name).payload) < n * per_value + 300


@pytest.mark.parametrize("bits", [2, 3, 4])  # int2, int3, int4
@pytest.mark.parametrize("n", [*range(0, 2 * 64 + 2), 1000])
def test_n_bit_levels_take_the_nearest_level_and_pack_eight_values_in_n_bytes(bits, n):
    g = torch.Generator().manual_seed(n + bits)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g)
    codes, scales, got = blocks.levels_encode(x, 64, bits)
    nb, top = math.ceil(n / 64), (1 << bits) - 1
    assert codes.shape == (nb * 8 * bits,) and scales.shape == (nb,)
    for j in range(nb):
        block = x[j * 64 : (j + 1) * 64]
        m = float(block.double().abs().mean()) * blocks.LEVEL_SCALE[bits]
        s = float(torch.tensor(m).to(torch.bfloat16))
        assert float(scales[j]) == s
        levels = torch.arange(-top, top + 1, 2, dtype=torch.float32) * s
        out = got[j * 64 : (j + 1) * 64]
        nearest = (block.unsqueeze(1) - levels).abs().min(dim=1).values
        assert bool(((out.unsqueeze(1) == levels).any(dim=1)).all())
        assert bool(((out - block).abs() <= nearest + 1e-6 * s).all())
    # The packing by hand: value i of the tensor holds bits [bits*i, bits*i + bits) of the
    # little-endian bit string of the codes.
    if n:
        bitstring = "".join(f"{int(b):08b}"[::-1] for b in codes)
        level = [int(bitstring[bits * i : bits * i + bits][::-1], 2) for i in range(n)]
        want = torch.tensor([(2 * c - top) for c in level], dtype=torch.float32)
        assert torch.equal(got, want * scales.float().repeat_interleave(64)[:n])
    assert torch.equal(blocks.levels_decode(codes, scales, 64, n, bits), got)


def test_int2_is_the_two_bit_levels_byte_for_byte():
    x = torch.randn(1000)
    pairs = zip(blocks.int2_encode(x), blocks.levels_encode(x, 64, 2), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    codes, _, _ = blocks.int2_encode(torch.tensor([-3.0, -1.0, 1.0, 3.0] * 16))
    assert codes[0] == 0b11100100  # the first value in bits 0-1, as docs/protocol.md says
