"""The codecs' kernels and wire layouts, per block of a flattened tensor. Pure torch: no I/O.

``codec.py`` turns state-dict changes into payloads with these; ``dataplane/plan.py`` cuts
payloads into shards on their block boundaries with the same :class:`Spec`. Every kernel
here computes per block (or per value), with exact float32 arithmetic on decoding, so a run
of whole blocks encodes and decodes on its own to the same bits as the whole tensor, on any
CPU.

A codec's :class:`Spec` names its wire tensors (:class:`Part`) for one floating tensor of
``n`` values, in the order a piece of the sharded data plane lays them out:

=========  ==========================================  =======================================
codec      parts                                       bytes of ``n`` values (``b`` blocks)
=========  ==========================================  =======================================
bfloat16   ``values/``: bfloat16, one per value        ``2n``
int8       ``codes/``: int8, one per value;            ``n + 4b``
           ``scales/``: float32, one per block
topk       ``codes/``: uint8, ``keep`` per block;      ``keep·b + 2b``
           ``scales/``: bfloat16, one per block
sign       ``codes/``: uint8, ``block / 8`` per block  ``block·b / 8 + 2b``
           (one bit per value, the first value in
           bit 0); ``scales/``: bfloat16, one per
           block
int2       ``codes/``: uint8, ``block / 4`` per block  ``block·b / 4 + 2b``
           (two bits per value, the first value in
           bits 0-1); ``scales/``: bfloat16, one per
           block
int3       ``codes/``: uint8, ``3·block / 8`` per      ``3·block·b / 8 + 2b``
           block (8 values in 3 bytes);
           ``scales/``: bfloat16, one per block
int4       ``codes/``: uint8, ``block / 2`` per block  ``block·b / 2 + 2b``
           (two values per byte, the first in bits
           0-3); ``scales/``: bfloat16, one per block
=========  ==========================================  =======================================

A topk code byte is ``position | negative << 6 | double << 7``: the kept value's position in
its block, its sign, and whether it is ``2·scale`` rather than ``scale``. A sign code bit is
1 for a negative value: every value decodes to ``±scale``, the scale being the mean magnitude
of the block's values (summed pairwise in float64, in a fixed order: the same bits on every
CPU) rounded to bfloat16. An int2 code ``c`` (0 to 3) decodes to ``(2c - 3)·scale``: ``±scale``
or ``±3·scale``, the scale being half the block's mean magnitude (summed the same way), close
to the best four levels for bell-shaped values; a value takes the nearest level. int3 and
int4 are the same with 8 and 16 levels ``(2c - 7)·scale`` and ``(2c - 15)·scale``, their
scale 3/8 and 7/32 of the mean magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK = 64  # int8: values per block (docs/benchmarks.md, "int8 block size")
TOPK_BLOCK = 64  # topk: values per block; at most 64 (a position is 6 bits)
TOPK_KEEP = 4  # topk: values kept per block (docs/benchmarks.md, "outer_sweep.py": 12 is no better)
MIN_BLOCK, MAX_BLOCK = 8, 1 << 20
TOPK_MAX_BLOCK = 64
SIGN_BLOCK = 64  # sign: values per block, a power of two (as int8's)
PACKED_MAX_BLOCK = 4096  # sign and intN: bit-packed codes, a power of two per block
INT2_BLOCK = 64  # int2, int3 and int4: values per block, a power of two
# The codecs of uniform levels, by bits per value (:func:`levels_encode`).
LEVEL_CODECS = {"int2": 2, "int3": 3, "int4": 4}
QMAX = 127

CODES, SCALES, VALUES = "codes/", "scales/", "values/"


@dataclass(frozen=True)
class Part:
    """One wire tensor of a floating tensor: its name prefix, dtype, and how many values it
    holds per block (0: one per value of the tensor, shaped like it)."""

    prefix: str
    dtype: torch.dtype
    per_block: int


@dataclass(frozen=True)
class Spec:
    """A codec with its parameters, as a payload's ``drift_codec`` metadata names it
    (:meth:`__str__`; :func:`parse` reads it back)."""

    name: str
    block: int = BLOCK
    keep: int = 0  # topk only: values kept per block

    @classmethod
    def of(cls, name: str) -> Spec:
        """The codec ``name`` with this version's parameters."""
        if name == "topk":
            return cls(name, TOPK_BLOCK, TOPK_KEEP)
        if name == "sign":
            return cls(name, SIGN_BLOCK)
        if name in LEVEL_CODECS:
            return cls(name, INT2_BLOCK)
        return cls(name, BLOCK)

    def __str__(self) -> str:
        if self.name in ("int8", "sign", *LEVEL_CODECS):
            return f"{self.name}/{self.block}"
        if self.name == "topk":
            return f"topk/{self.block}/{self.keep}"
        return self.name

    @property
    def parts(self) -> tuple[Part, ...]:
        if self.name == "int8":
            return (Part(CODES, torch.int8, 0), Part(SCALES, torch.float32, 1))
        if self.name == "topk":
            return (Part(CODES, torch.uint8, self.keep), Part(SCALES, torch.bfloat16, 1))
        if self.name == "sign":
            return (Part(CODES, torch.uint8, self.block // 8), Part(SCALES, torch.bfloat16, 1))
        if self.name in LEVEL_CODECS:
            per_block = self.block * LEVEL_CODECS[self.name] // 8
            return (Part(CODES, torch.uint8, per_block), Part(SCALES, torch.bfloat16, 1))
        return (Part(VALUES, torch.bfloat16, 0),)

    def count(self, part: Part, numel: int) -> int:
        """Values of ``part`` for a tensor of ``numel`` values."""
        return numel if part.per_block == 0 else math.ceil(numel / self.block) * part.per_block

    def nbytes(self, numel: int) -> int:
        """Bytes of a tensor (or a run of whole blocks) of ``numel`` values on the wire."""
        return sum(self.count(p, numel) * p.dtype.itemsize for p in self.parts)

    def encode(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(wire tensors by prefix, the decoded values in ``x``'s dtype and shape)."""
        if self.name == "int8":
            codes, scales = quantize(x, self.block)
            return {CODES: codes, SCALES: scales}, dequantize(codes, scales, self.block).to(x.dtype)
        if self.name == "topk":
            codes, scales, got = topk_encode(x, self.block, self.keep)
            return {CODES: codes, SCALES: scales}, got.to(x.dtype)
        if self.name == "sign":
            codes, scales, got = sign_encode(x, self.block)
            return {CODES: codes, SCALES: scales}, got.to(x.dtype)
        if self.name in LEVEL_CODECS:
            codes, scales, got = levels_encode(x, self.block, LEVEL_CODECS[self.name])
            return {CODES: codes, SCALES: scales}, got.to(x.dtype)
        b16 = x.to(torch.bfloat16)
        return {VALUES: b16}, b16.to(x.dtype)

    def decode(self, parts: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        """The float32 values (flat) of wire tensors of the right dtypes and counts; ValueError
        says what is wrong with values no encoder writes."""
        if self.name == "bfloat16":
            x = parts[VALUES].reshape(-1).to(torch.float32)
            if not bool(torch.isfinite(x).all()):
                raise ValueError("holds non-finite values (NaN or inf)")
            return x
        scales = parts[SCALES]
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise ValueError("scales must be finite and >= 0")
        if self.name == "int8":
            return dequantize(parts[CODES].reshape(-1), scales, self.block)
        if self.name == "sign":
            return sign_decode(parts[CODES], scales, self.block, numel)
        if self.name in LEVEL_CODECS:
            return levels_decode(parts[CODES], scales, self.block, numel, LEVEL_CODECS[self.name])
        return topk_decode(parts[CODES], scales, self.block, numel)


def parse(spec: str) -> Spec:
    """The :class:`Spec` a ``drift_codec`` metadata value names; ValueError when it is none
    this version reads."""
    name, _, rest = spec.partition("/")
    args = rest.split("/") if rest else []
    nums = [int(a) if a.isdigit() and len(a) < 9 else -1 for a in args]
    if name == "bfloat16":
        if args:
            raise ValueError(f"unknown codec {spec[:40]!r} (bfloat16 takes no block size)")
        return Spec(name)
    if name == "int8":
        if len(nums) != 1 or not MIN_BLOCK <= nums[0] <= MAX_BLOCK:
            raise ValueError(f"int8 block size {rest[:20]!r} is not in [{MIN_BLOCK}, {MAX_BLOCK}]")
        return Spec(name, nums[0])
    if name == "topk":
        if len(nums) != 2 or not (
            MIN_BLOCK <= nums[0] <= TOPK_MAX_BLOCK and 1 <= nums[1] <= nums[0]
        ):
            raise ValueError(
                f"topk block and kept values {rest[:20]!r} must be BLOCK/KEEP with BLOCK in "
                f"[{MIN_BLOCK}, {TOPK_MAX_BLOCK}] and KEEP in [1, BLOCK]"
            )
        return Spec(name, nums[0], nums[1])
    if name in ("sign", *LEVEL_CODECS):
        block = nums[0] if len(nums) == 1 else -1
        if not (MIN_BLOCK <= block <= PACKED_MAX_BLOCK and block & (block - 1) == 0):
            raise ValueError(
                f"{name} block size {rest[:20]!r} must be a power of two in "
                f"[{MIN_BLOCK}, {PACKED_MAX_BLOCK}]"
            )
        return Spec(name, block)
    raise ValueError(
        f"unknown codec {spec[:40]!r} (this side knows bfloat16, int8/BLOCK, topk/BLOCK/KEEP, "
        "sign/BLOCK, int2/BLOCK, int3/BLOCK and int4/BLOCK)"
    )


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's values, flattened in C order, as raw little-endian bytes (every supported
    host is little-endian): how pieces and compact changes carry them."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes() if t.numel() else b""


def from_raw(buf: bytes, at: int, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, int]:
    """(``n`` values of ``dtype`` read from ``buf`` at byte ``at``, the byte after them); the
    caller has checked that ``buf`` holds them."""
    if n == 0:
        return torch.empty(0, dtype=dtype), at
    size = n * dtype.itemsize
    return torch.frombuffer(bytearray(buf[at : at + size]), dtype=dtype), at + size


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` flattened in C order, padded with zeros to whole blocks, as (blocks, block)."""
    n = x.numel()
    nb = math.ceil(n / block)
    flat = x.reshape(-1)
    if nb * block != n:
        flat = torch.cat([flat, flat.new_zeros(nb * block - n)])
    return flat.view(nb, block)


def quantize(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes shaped like ``x``, float32 scales ``absmax / 127`` of its blocks)."""
    blocks = _blocks(x, block)
    scales = (blocks.abs().amax(dim=1) / QMAX).to(torch.float32)
    # Divide by the scale as stored (float32), so codes and decoding agree; a zero block
    # divides by 1 and gives codes 0.
    div = torch.where(scales > 0, scales, torch.ones_like(scales)).to(blocks.dtype)
    codes = torch.round(blocks / div.unsqueeze(1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes.reshape(-1)[: x.numel()].reshape(x.shape).contiguous(), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """float32 ``code * scale`` per block, shaped like ``codes``: one correctly rounded
    multiply per value."""
    out = _blocks(codes.to(torch.float32), block) * scales.unsqueeze(1)
    return out.reshape(-1)[: codes.numel()].reshape(codes.shape)


def topk_encode(
    x: torch.Tensor, block: int = TOPK_BLOCK, keep: int = TOPK_KEEP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes, ``keep`` per block; bfloat16 scales, one per block; the float32 values
    they decode to, shaped like ``x``). Each block keeps its ``keep`` values of largest
    magnitude, the lower position first among equals (a stable sort: the same choice on
    every machine), in ascending position order."""
    blocks = _blocks(x, block)
    order = torch.sort(blocks.abs(), dim=1, descending=True, stable=True).indices[:, :keep]
    pos = order.sort(dim=1).values
    kept = blocks.gather(1, pos)
    mag = kept.abs()
    scales = (mag.amax(dim=1) / 2).to(torch.bfloat16)
    double = mag > scales.to(kept.dtype).unsqueeze(1) * 1.5
    negative = kept < 0
    codes = (pos | (negative.to(torch.int64) << 6) | (double.to(torch.int64) << 7)).to(torch.uint8)
    got = _topk_values(pos, negative, double, scales, block, x.numel())
    return codes.reshape(-1), scales, got.reshape(x.shape)


def topk_decode(codes: torch.Tensor, scales: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    """The float32 values (flat, ``numel``) of :func:`topk_encode`'s codes and scales;
    ValueError for a position outside the block or one kept twice in a block."""
    nb = scales.numel()
    c = codes.reshape(nb, codes.numel() // max(1, nb)).to(torch.int64)
    pos = c & 63
    if bool((pos >= block).any()):
        raise ValueError(f"has a kept position outside its block of {block}")
    if c.shape[1] > 1:
        ordered = pos.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("keeps a position twice in one block")
    return _topk_values(pos, (c >> 6) & 1 == 1, c >> 7 == 1, scales, block, numel)


def sign_encode(
    x: torch.Tensor, block: int = SIGN_BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes, one bit per value; bfloat16 scales, the mean magnitude of each block;
    the float32 values they decode to, shaped like ``x``)."""
    n = x.numel()
    blocks = _blocks(x, block)
    scales = _mean_magnitude(blocks, n).to(torch.bfloat16)
    negative = (blocks < 0).to(torch.uint8).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    codes = (negative * weights).sum(dim=1, dtype=torch.uint8)
    got = sign_decode(codes, scales, block, n)
    return codes, scales, got.reshape(x.shape)


def sign_decode(codes: torch.Tensor, scales: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    """The float32 values (flat, ``numel``) of :func:`sign_encode`'s codes and scales: every
    value ``±scale`` of its block (exact)."""
    bits = (codes.reshape(-1, 1).to(torch.int64) >> torch.arange(8)) & 1
    sign = 1.0 - 2.0 * bits.reshape(scales.numel(), block).to(torch.float32)
    return (sign * scales.to(torch.float32).unsqueeze(1)).reshape(-1)[:numel]


# intN: the scale per block is the block's mean magnitude times this, near the best uniform
# step for bell-shaped values of each width (a dyadic fraction: the same bits everywhere).
LEVEL_SCALE = {2: 0.5, 3: 0.375, 4: 0.21875}


def int2_encode(
    x: torch.Tensor, block: int = INT2_BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes, two bits per value; bfloat16 scales, half the mean magnitude of each
    block; the float32 values they decode to, shaped like ``x``): each value takes the
    nearest of ``-3, -1, 1, 3`` times its block's scale."""
    return levels_encode(x, block, 2)


def int2_decode(codes: torch.Tensor, scales: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    """The float32 values (flat, ``numel``) of :func:`int2_encode`'s codes and scales:
    ``(2c - 3)·scale`` (exact)."""
    return levels_decode(codes, scales, block, numel, 2)


def levels_encode(
    x: torch.Tensor, block: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes, ``bits`` bits per value; bfloat16 scales, the block's mean magnitude
    times :data:`LEVEL_SCALE`; the float32 values they decode to, shaped like ``x``): each
    value takes the nearest of the ``L = 2^bits`` levels ``(2c - (L - 1))·scale``. Every 8
    values pack into ``bits`` bytes, value ``j`` of the 8 in bits ``bits·j`` onwards of their
    little-endian integer."""
    n = x.numel()
    top = (1 << bits) - 1
    blocks = _blocks(x, block)
    scales = (_mean_magnitude(blocks, n) * LEVEL_SCALE[bits]).to(torch.bfloat16)
    div = torch.where(scales > 0, scales, torch.ones_like(scales)).to(blocks.dtype)
    # level (2c - top) nearest to x / scale: c = round((x / scale + top) / 2), each a correctly
    # rounded operation; a zero block divides by 1 and decodes to 0 whatever its codes.
    c = torch.round((blocks / div.unsqueeze(1) + top) / 2).clamp_(0, top).to(torch.int64)
    packed = (c.view(-1, 8) << (bits * torch.arange(8))).sum(dim=1, keepdim=True)
    codes = ((packed >> (8 * torch.arange(bits))) & 255).to(torch.uint8).reshape(-1)
    got = levels_decode(codes, scales, block, n, bits)
    return codes, scales, got.reshape(x.shape)


def levels_decode(
    codes: torch.Tensor, scales: torch.Tensor, block: int, numel: int, bits: int
) -> torch.Tensor:
    """The float32 values (flat, ``numel``) of :func:`levels_encode`'s codes and scales:
    ``(2c - (2^bits - 1))·scale`` (exact: a level of at most 5 bits times a bfloat16)."""
    top = (1 << bits) - 1
    groups = codes.reshape(-1, bits).to(torch.int64)
    packed = (groups << (8 * torch.arange(bits))).sum(dim=1, keepdim=True)
    c = (packed >> (bits * torch.arange(8))) & top
    levels = (2 * c - top).reshape(scales.numel(), block).to(torch.float32)
    return (levels * scales.to(torch.float32).unsqueeze(1)).reshape(-1)[:numel]


def _mean_magnitude(blocks: torch.Tensor, numel: int) -> torch.Tensor:
    """float64 mean of each block's magnitudes over its ``numel``'s real values, summed
    pairwise in a fixed order (one correctly rounded add per pair: the same bits on any
    CPU). The block size is a power of two."""
    total = blocks.abs().to(torch.float64)
    while total.shape[1] > 1:
        total = total[:, 0::2] + total[:, 1::2]
    block = blocks.shape[1]
    counts = torch.full((blocks.shape[0],), float(block), dtype=torch.float64)
    if numel % block:
        counts[-1] = float(numel % block)
    return total.reshape(-1) / counts


def _topk_values(
    pos: torch.Tensor,
    negative: torch.Tensor,
    double: torch.Tensor,
    scales: torch.Tensor,
    block: int,
    numel: int,
) -> torch.Tensor:
    """float32 values: ``±1`` or ``±2`` times the block's scale at each kept position (exact
    products), 0 elsewhere; positions in the padding of a last short block are dropped."""
    q = (1.0 + double.to(torch.float32)) * (1.0 - 2.0 * negative.to(torch.float32))
    vals = q * scales.to(torch.float32).unsqueeze(1)
    out = torch.zeros(scales.numel(), block, dtype=torch.float32)
    out.scatter_(1, pos, vals)
    return out.reshape(-1)[:numel]


__all__ = [
    "BLOCK",
    "TOPK_BLOCK",
    "TOPK_KEEP",
    "Part",
    "Spec",
    "dequantize",
    "from_raw",
    "LEVEL_CODECS",
    "int2_decode",
    "int2_encode",
    "levels_decode",
    "levels_encode",
    "parse",
    "quantize",
    "raw_bytes",
    "sign_decode",
    "sign_encode",
    "topk_decode",
    "topk_encode",
]
