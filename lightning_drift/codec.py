"""Compressed weight changes: a state-dict delta to bytes and back. Pure torch: no I/O.

A *change* (delta) maps every tensor name of a model to either

- for a floating tensor: how much it changed (``new - old``), or
- for an integer or bool buffer (``num_batches_tracked``, masks): its new value, because such
  values cannot be subtracted or averaged; they travel as they are;
- for a carried tensor of the old weights (``modelspec.carried``: non-finite by design, such
  as an additive mask of ``-inf``): exactly 0 when it is unchanged, where ``new - old`` would
  be NaN (``-inf - -inf``); applying a change keeps it as the old weights hold it, bit for bit.

Codecs (``TransferDType`` in the protocol, ``--transfer-dtype`` on the coordinator):

``bfloat16``
    every floating change cast to bfloat16: 2 bytes per value.
``int8``
    every floating change cut into blocks of :data:`BLOCK` consecutive values (the tensor
    flattened in C order, the last block padded with zeros); each block stores one float32
    scale ``absmax / 127`` and one int8 code per value, ``round(x / scale)``: 1 + 4 / BLOCK
    bytes per value. A block of zeros has scale 0 and codes 0.
``topk``
    sparse and low-bit: every floating change cut into blocks of :data:`TOPK_BLOCK` values (as
    int8's); each block keeps its :data:`TOPK_KEEP` values of largest magnitude (ties to the
    lower position) at 2 bits each, ``±scale`` or ``±2·scale`` with one bfloat16 ``scale``
    per block (its largest kept magnitude over 2). A kept value travels as one byte: its
    position in the block (6 bits), its sign, and which of the two magnitudes. With the
    defaults (4 of 64) that is 6 bytes per 64 values, 0.094 bytes per value: 43x fewer than
    float32, 11x fewer than int8; the values left out wait in the error feedback.
``int2``
    every value of each block of 64 at two bits: ``±scale`` or ``±3·scale``, the nearest, with
    one bfloat16 ``scale`` per block (half its mean magnitude): 18 bytes per 64 values, 14x
    fewer than float32.
``sign``
    every value of each block of 64 at one bit, its sign, times one bfloat16 ``scale`` per
    block (its mean magnitude): 10 bytes per 64 values, 26x fewer than float32.

``blocks.py`` holds their kernels and layouts; docs/strategy.md says which to pick. All are
lossy. :class:`Residual` is the **error feedback**: the part of each change that the
codec could not carry is kept by its owner (a node for its uploads, the coordinator for its
downloads) and added to the next change, so nothing is lost over rounds: after any number of
rounds, the sum of what was applied plus the residual equals the sum of the true changes (up
to the float32 rounding of one addition and one subtraction per round).

Reconstruction is bit-for-bit identical on every machine: decoding is ``code.float() *
scale`` (int8; topk's ``±1`` or ``±2``, int2's ``±1`` or ``±3`` and sign's ``±1`` by their
scale, all exact), or ``value.float()`` (bfloat16), and applying is ``old + change``, each a plain,
correctly rounded float32 operation on the CPU, done the same way by every side (no fused
multiply-add). Tensors in float64 are changed in float64; float16 and bfloat16 ones in
float32 and cast back.

Every codec computes per block (bfloat16: per value) of the flattened tensor,
so a run of whole blocks of a tensor encodes and decodes on its own, to the same bits: the
sharded data plane (``dataplane/plan.py``) cuts changes there.

The payload is compact (:func:`pack`): the codec's name (``bfloat16``, ``int8/<block
size>``, ``int2/<block size>``, ``sign/<block size>`` or ``topk/<block size>/<kept per
block>``), then the wire tensors' raw bytes in the model's name order, without tensor names:
both sides know the model, and the names would cost 13 % of an int2 change of a small model.
:func:`decode` also reads the same tensors as a safetensors file whose metadata names the
codec (``drift_codec``). docs/protocol.md §5 gives the layouts.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import safetensors.torch
import torch

from lightning_drift.blocks import (
    BLOCK,
    TOPK_BLOCK,
    TOPK_KEEP,
    VALUES,
    Spec,
    dequantize,
    from_raw,
    parse,
    quantize,
    raw_bytes,
)
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.modelspec import TensorSpec, carried, same_bits

StateDict = dict[str, torch.Tensor]
Codec = Literal["bfloat16", "int8", "topk", "sign", "int2", "int3", "int4"]
CODECS: tuple[str, ...] = ("bfloat16", "int8", "topk", "sign", "int2", "int3", "int4")

META_CODEC = "drift_codec"
# A compact change (what encode writes): this magic, one byte giving the length of the codec's
# name, the name (``int8/64``), then the wire tensors' raw bytes in the model's name order
# (docs/protocol.md §5). No tensor names: both sides know the model.
COMPACT = b"DRC1"
COMPACT_NAME_MAX = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype changes of a ``dtype`` tensor are computed and applied in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Residual:
    """Error feedback: what a lossy codec left out so far, by tensor name.

    Owned by whoever encodes (a node for its uploads, the coordinator for its downloads) and
    passed to every :func:`encode`; save it with :meth:`state_dict` where it must survive a
    restart. Empty until the first encode.
    """

    def __init__(self) -> None:
        self._r: StateDict = {}

    def __len__(self) -> int:
        return len(self._r)

    def get(self, name: str) -> torch.Tensor | None:
        return self._r.get(name)

    def clear(self) -> None:
        """Forget everything: call it when the change it belongs to was thrown away."""
        self._r = {}

    def state_dict(self) -> StateDict:
        """The residual tensors by name (copies)."""
        return {k: v.clone() for k, v in self._r.items()}

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        self._r = {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


@dataclass(frozen=True)
class Encoded:
    """An encoded change: the ``payload`` bytes and ``applied``, exactly what
    :func:`decode` gives back from them (floating changes in their compute dtype)."""

    payload: bytes
    applied: StateDict


def difference(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> StateDict:
    """The change from ``old`` to ``new``: ``new - old`` for floating tensors (in their compute
    dtype, on the CPU), ``new``'s value for the others. A carried tensor of ``old`` that ``new``
    holds unchanged has the change 0; one that changed has ``new - old`` where the values
    differ (0 where they are equal, not NaN), which the receiver refuses by name."""
    fixed = carried(old)
    out: StateDict = {}
    for k, v in new.items():
        v = v.detach().cpu()
        if k in fixed:
            o = old[k].detach().cpu()
            cdt = compute_dtype(o.dtype)
            zero = torch.zeros(v.shape, dtype=cdt)
            out[k] = zero if same_bits(v, o) else torch.where(v == o, zero, v.to(cdt) - o.to(cdt))
        elif v.is_floating_point():
            cdt = compute_dtype(old[k].dtype)
            out[k] = v.to(cdt) - old[k].detach().cpu().to(cdt)
        else:
            out[k] = v.clone()
    return out


def apply(base: Mapping[str, torch.Tensor], change: Mapping[str, torch.Tensor]) -> StateDict:
    """``base`` moved by ``change``: ``base + change`` for floating tensors (computed in their
    compute dtype, cast back to ``base``'s), ``change``'s value for the others; carried tensors
    of ``base`` stay as they are (their change is 0). New tensors on the CPU, in ``base``'s key
    order; the coordinator and every node call this same function, so they get the same
    bits."""
    fixed = carried(base)
    out: StateDict = {}
    for k, b in base.items():
        c = change[k]
        if k in fixed:
            out[k] = b.detach().cpu().clone()
        elif b.is_floating_point():
            cdt = compute_dtype(b.dtype)
            x = b.detach().cpu().to(cdt, copy=True)
            x.add_(c.to(cdt))
            out[k] = x.to(b.dtype)
        else:
            out[k] = c.detach().cpu().to(b.dtype, copy=True)
    return out


def encode(
    change: Mapping[str, torch.Tensor], codec: str, residual: Residual | None = None
) -> Encoded:
    """Encode ``change`` (see the module docstring) with ``codec``, as a compact change
    (:func:`pack`).

    With ``residual``, its content is added to each floating change first, and it then holds
    what this encoding left out (``(change + residual) - applied``).
    """
    tensors, applied = encode_tensors(change, codec, residual)
    return Encoded(pack(tensors, Spec.of(codec)), applied)


def pack(tensors: Mapping[str, torch.Tensor], spec: Spec) -> bytes:
    """A compact change of the wire tensors ``tensors`` (keyed as :func:`encode_tensors` keys
    them): :data:`COMPACT`, the codec's name, then for each tensor of the model by name, its
    values (an integer or bool buffer) or its codec's parts in order (a floating one), raw.
    Equal changes give equal bytes."""
    name = str(spec).encode()
    out = bytearray(COMPACT + bytes([len(name)]) + name)
    prefixes = {p.prefix for p in spec.parts} | {VALUES}
    names = sorted({k[len(p) :] for k in tensors for p in prefixes if k.startswith(p)})
    for k in names:
        if spec.name != "bfloat16" and VALUES + k in tensors:
            out += raw_bytes(tensors[VALUES + k])
            continue
        for part in spec.parts:
            out += raw_bytes(tensors[part.prefix + k])
    return bytes(out)


def is_compact(prefix: bytes | bytearray | memoryview) -> bool:
    """Whether bytes start as a compact change does (:data:`COMPACT`); a safetensors file
    cannot (its first 8 bytes are a header length far below this magic's)."""
    return bytes(prefix[: len(COMPACT)]) == COMPACT


def compact_needs(prefix: bytes | bytearray | memoryview) -> int:
    """How many leading bytes of a compact change :func:`compact_spec` needs; SessionError
    when the name's length is over :data:`COMPACT_NAME_MAX`."""
    head = len(COMPACT) + 1
    if len(prefix) < head:
        return head
    n = prefix[len(COMPACT)]
    if not 0 < n <= COMPACT_NAME_MAX:
        raise _bad(f"a compact change's codec name of {n} bytes (1 to {COMPACT_NAME_MAX})")
    return head + n


def compact_spec(prefix: bytes | bytearray | memoryview) -> Spec:
    """The codec a compact change names (from its first :func:`compact_needs` bytes);
    SessionError when this side does not know it."""
    need = compact_needs(prefix)
    if len(prefix) < need:
        raise _bad("it ends inside its header")
    text = bytes(prefix[len(COMPACT) + 1 : need])
    if not text.isascii() or not text.decode().isprintable():
        raise _bad(f"a codec name that is not printable ASCII: {text[:20]!r}")
    return _parse_spec(text.decode())


def compact_size(table: Mapping[str, TensorSpec], spec: Spec) -> int:
    """The bytes of a compact change of codec ``spec`` for a model of tensor ``table``."""
    body = sum(spec.nbytes(t.numel) if t.floating else t.nbytes for t in table.values())
    return len(COMPACT) + 1 + len(str(spec).encode()) + body


def unpack(raw: bytes, table: Mapping[str, TensorSpec]) -> tuple[Spec, StateDict]:
    """(the codec, the wire tensors keyed as :func:`encode_tensors` keys them) of a compact
    change for a model of tensor ``table``; SessionError(code="bad_upload") when its codec is
    unknown, its size is not the model's, or a bool buffer holds other bytes than 0 and 1."""
    spec = compact_spec(raw)
    size = compact_size(table, spec)
    if len(raw) != size:
        raise _bad(f"a compact {spec} change of this model is {size} bytes, not {len(raw)}")
    at = compact_needs(raw)
    tensors: StateDict = {}
    for k, t in sorted(table.items()):
        if not t.floating:
            v, at = from_raw(raw, at, t.dtype, t.numel)
            if t.dtype == torch.bool and bool((v.view(torch.uint8) > 1).any()):
                raise _bad(f"bool buffer {k[:80]!r} holds bytes other than 0 and 1")
            tensors[VALUES + k] = v.reshape(t.shape)
            continue
        for part in spec.parts:
            v, at = from_raw(raw, at, part.dtype, spec.count(part, t.numel))
            tensors[part.prefix + k] = v.reshape(t.shape) if part.per_block == 0 else v
    return spec, tensors


def encode_tensors(
    change: Mapping[str, torch.Tensor], codec: str, residual: Residual | None = None
) -> tuple[StateDict, StateDict]:
    """:func:`encode`'s work without the file: (the payload's tensors, keyed ``codes/<name>``,
    ``scales/<name>`` or ``values/<name>``, and the applied change). A shard of the sharded
    data plane encodes its slices with it."""
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")
    spec = Spec.of(codec)
    tensors: StateDict = {}
    applied: StateDict = {}
    for k, v in change.items():
        v = v.detach().cpu()
        if not v.is_floating_point():
            tensors[VALUES + k] = v.contiguous()
            applied[k] = v.clone()
            continue
        cdt = compute_dtype(v.dtype)
        x = v.to(cdt, copy=True)
        r = residual.get(k) if residual is not None else None
        if r is not None:
            x.add_(r.to(cdt))
        wire, got = spec.encode(x)
        for prefix, t in wire.items():
            tensors[prefix + k] = t
        applied[k] = got
        if residual is not None:
            residual._r[k] = x.sub_(got)
    return tensors, applied


def decode(payload: bytes | bytearray | memoryview, like: Mapping[str, torch.Tensor]) -> StateDict:
    """The change a payload of :func:`encode` carries, checked against the model ``like``
    (the same names, shapes and, for integer and bool buffers, dtypes).

    Floating changes come back in ``like``'s compute dtype. A payload written without a codec
    name (plain safetensors: earlier bfloat16 deltas) is read as floating changes in any
    floating dtype. ``SessionError(code="bad_upload")`` says what is wrong with a bad one.
    """
    raw = bytes(payload)
    if is_compact(raw):
        spec, tensors = unpack(
            raw, {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in like.items()}
        )
    else:
        try:
            meta = _metadata(raw)
            tensors = safetensors.torch.load(raw)
        except Exception as exc:  # the binding raises its own SafetensorError or others
            raise _bad(f"not a valid safetensors change ({len(raw)} bytes): {exc}") from None
        text = meta.get(META_CODEC, "")
        if not text:
            return _decode_plain(tensors, like)
        spec = _parse_spec(text)
    out: StateDict = {}
    used: set[str] = set()
    for k, ref in like.items():
        if not ref.is_floating_point():
            v = _take(tensors, used, VALUES + k, k)
            if v.dtype != ref.dtype or v.shape != ref.shape:
                raise _bad(
                    f"{k!r} is {_dt(v.dtype)} {tuple(v.shape)}, the model has "
                    f"{_dt(ref.dtype)} {tuple(ref.shape)}"
                )
            out[k] = v
            continue
        parts: StateDict = {}
        for part in spec.parts:
            t = _take(tensors, used, part.prefix + k, k)
            shape = tuple(ref.shape) if part.per_block == 0 else (spec.count(part, ref.numel()),)
            if t.dtype != part.dtype or tuple(t.shape) != shape:
                raise _bad(
                    f"{part.prefix.rstrip('/')} of {k!r} are {_dt(t.dtype)} {tuple(t.shape)}, "
                    f"expected {_dt(part.dtype)} {shape} for {spec}"
                )
            parts[part.prefix] = t
        try:
            x = spec.decode(parts, ref.numel())
        except ValueError as exc:
            raise _bad(f"{k!r} {exc}") from None
        out[k] = x.reshape(ref.shape).to(compute_dtype(ref.dtype))
    extra = sorted(set(tensors) - used)
    if extra:
        raise _bad(f"{len(extra)} tensor(s) not in the model: {', '.join(map(repr, extra[:5]))}")
    return out


def payload_table(table: Mapping[str, TensorSpec], spec: str) -> dict[str, TensorSpec]:
    """The tensor table of a payload of codec ``spec`` (its ``drift_codec`` metadata) for a
    model of tensor table ``table``: what an upload's header must show before its body is read.
    SessionError(code="bad_upload") for a codec this side does not know."""
    parsed = _parse_spec(spec)
    out: dict[str, TensorSpec] = {}
    for k, t in table.items():
        if not t.floating:
            out[VALUES + k] = t
            continue
        for part in parsed.parts:
            shape = t.shape if part.per_block == 0 else (parsed.count(part, t.numel),)
            out[part.prefix + k] = TensorSpec(part.dtype, shape)
    return out


def _parse_spec(spec: str) -> Spec:
    """The :class:`~lightning_drift.blocks.Spec` of a ``drift_codec`` metadata value;
    SessionError when this side does not know it."""
    try:
        return parse(spec)
    except ValueError as exc:
        raise _bad(str(exc)) from None


def nbytes(numel: int, codec: str) -> float:
    """Bytes per value a codec spends on a floating tensor of ``numel`` values (no header)."""
    if codec in CODECS:
        return Spec.of(codec).nbytes(numel) / max(1, numel)
    return 4.0


# ---- internals ------------------------------------------------------------------------------


def _decode_plain(tensors: StateDict, like: Mapping[str, torch.Tensor]) -> StateDict:
    out: StateDict = {}
    for k, ref in like.items():
        if k not in tensors:
            raise _bad(f"missing {k!r} of the model")
        v = tensors[k]
        out[k] = v.to(compute_dtype(ref.dtype)) if ref.is_floating_point() else v
    extra = sorted(set(tensors) - set(like))
    if extra:
        raise _bad(f"{len(extra)} tensor(s) not in the model: {', '.join(map(repr, extra[:5]))}")
    return out


def _metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (an 8-byte little-endian header length, then
    the JSON header)."""
    if len(raw) < 8:
        raise ValueError("shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError(f"header of {n} bytes does not fit")
    header = json.loads(raw[8 : 8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _take(tensors: StateDict, used: set[str], key: str, name: str) -> torch.Tensor:
    v = tensors.get(key)
    if v is None:
        raise _bad(f"missing {key!r} for tensor {name!r} of the model")
    used.add(key)
    return v


def _bad(what: str) -> SessionError:
    return SessionError(
        f"bad compressed change: {what}; every node must train the same model "
        "with the same lightning-drift version",
        code="bad_upload",
    )


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = [
    "BLOCK",
    "CODECS",
    "COMPACT",
    "TOPK_BLOCK",
    "TOPK_KEEP",
    "Codec",
    "Encoded",
    "Residual",
    "apply",
    "compact_needs",
    "compact_size",
    "compact_spec",
    "compute_dtype",
    "is_compact",
    "decode",
    "dequantize",
    "difference",
    "encode",
    "encode_tensors",
    "nbytes",
    "pack",
    "quantize",
    "Spec",
    "unpack",
]
