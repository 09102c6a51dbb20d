"""The plan of a sharded round: a model's encoded change cut into S shards, and the bytes of
each shard's piece. Pure: no I/O, no clock.

A **shard** is a run of whole codec blocks (:data:`lightning_drift.codec.BLOCK` values of a
floating tensor flattened in C order; the last block of a tensor may be shorter) and whole
integer or bool buffers, in the model's tensor order. The shards are **byte-balanced**: shard
``j`` holds the units (blocks, buffers) whose first byte lies in ``[j·T/S, (j+1)·T/S)`` of
the encoded change's ``T`` bytes, so they differ by at most one unit. A shard may be empty
when one buffer is larger than ``T/S``; its piece is then empty too.

Cutting on block boundaries is what lets a shard be aggregated on its own: every step of a
round (the mean, DiLoCo's outer step, the int8 scales and codes, the error feedback) is
computed per value or per block, so a shard's result is the same bits as the same values of
the whole model's (``reduce.py``).

A **piece** is one shard of one encoded change, raw and little-endian, with no header: its
layout and size follow from the plan alone, so a piece of the wrong size is refused before a
value of it is read. For each span of the shard, in order:

- a floating span: its codec's wire parts in order (``blocks.Spec.parts``): for ``int8`` its
  codes (one int8 per value), then its blocks' scales (one float32 per block); for ``topk``
  its blocks' codes (``keep`` bytes per block), then their scales (one bfloat16 per block);
  for ``bfloat16`` its values (two bytes each);
- an integer or bool buffer: its values in its own dtype (a bool is one byte, 0 or 1).

:meth:`ShardPlan.pieces` cuts a change as :func:`lightning_drift.codec.encode` wrote it,
:meth:`ShardPlan.join` puts pieces back into exactly those bytes, and :meth:`ShardPlan.read`
turns a piece into the change slices it carries, checked (``SessionError(code="bad_upload")``
names what is wrong). The plan's :attr:`~ShardPlan.digest` names it: codec, block size,
shard count and the model's fingerprint.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_drift import codec
from lightning_drift.blocks import Spec, from_raw, raw_bytes
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.modelspec import TensorSpec, fingerprint

StateDict = dict[str, torch.Tensor]

MAX_SHARDS = 256  # more shards than this buys nothing but manifest bytes

_VALUES = "values/"  # codec.encode's name of an integer or bool buffer


@dataclass(frozen=True)
class Span:
    """Values ``[start, stop)`` of tensor ``name`` (flattened in C order): whole codec blocks of
    a floating tensor, or the whole of an integer or bool buffer."""

    name: str
    start: int
    stop: int
    dtype: torch.dtype

    @property
    def key(self) -> str:
        """The span's name in a slice dict: ``name@start`` (unique: ``start`` is a number)."""
        return f"{self.name}@{self.start}"

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class Shard:
    """One shard: its spans in model order and the bytes of its piece."""

    index: int
    spans: tuple[Span, ...]
    size: int


class ShardPlan:
    """A model's change cut into ``count`` byte-balanced shards for ``codec_name``'s encoding
    (see the module docstring)."""

    def __init__(
        self,
        table: Mapping[str, TensorSpec],
        codec_name: str,
        count: int,
        *,
        block: int | None = None,
    ) -> None:
        if codec_name not in codec.CODECS:
            raise ConfigError(
                f"a sharded data plane needs a codec ({', '.join(codec.CODECS)}), got "
                f"{codec_name!r}: set --transfer-dtype int2, sign, int8, topk or bfloat16"
            )
        if not 1 <= count <= MAX_SHARDS:
            raise ConfigError(f"shard count must be within 1..{MAX_SHARDS}, got {count}")
        spec = Spec.of(codec_name)
        if block is not None:
            if block < 1:
                raise ConfigError(f"block size must be at least 1, got {block}")
            spec = Spec(spec.name, block, min(spec.keep, block))
        self.table: dict[str, TensorSpec] = dict(table)
        self.codec = codec_name
        self.spec = spec
        self.block = spec.block
        self.count = count
        self.shards: tuple[Shard, ...] = _cut(self.table, spec, count)
        self.total = sum(s.size for s in self.shards)
        name = f"topk/{spec.block}/{spec.keep}" if spec.keep else f"{codec_name}/{spec.block}"
        what = f"drift/plan/1 {name} {count} {fingerprint(self.table)}"
        self.digest = hashlib.sha256(what.encode()).hexdigest()

    @classmethod
    def of(cls, table: Mapping[str, TensorSpec], codec_name: str, count: int) -> ShardPlan:
        """A session's plan of its model's tensor ``table``, taken by name, so that every
        member cuts the same shards whatever order its state dict holds them in."""
        return cls(dict(sorted(table.items())), codec_name, count)

    def __repr__(self) -> str:
        return f"ShardPlan({self.codec}/{self.block}, {self.count} shards, {self.total} bytes)"

    # ---- pieces of an encoded change --------------------------------------------------------

    def pieces(self, payload: bytes | bytearray | memoryview) -> list[bytes]:
        """The ``count`` pieces of a change encoded by :func:`lightning_drift.codec.encode`
        with this plan's codec (``SessionError(code="bad_upload")`` when it was not)."""
        raw = bytes(payload)
        if not codec.is_compact(raw):
            raise _bad(f"not a compact change ({len(raw)} bytes)")
        spec, wire = codec.unpack(raw, self.table)
        if spec != self.spec:
            raise _bad(f"a change of codec {spec}, the plan's is {self.spec}")
        return [self._piece(shard, wire) for shard in self.shards]

    def join(self, pieces: Sequence[bytes | bytearray | memoryview]) -> bytes:
        """The encoded change (``codec.encode``'s bytes) the ``count`` pieces make up; each
        is checked (:meth:`read`) first."""
        if len(pieces) != self.count:
            raise _bad(f"{len(pieces)} pieces for a plan of {self.count} shards")
        wire: dict[str, list[torch.Tensor]] = {}
        for shard, piece in zip(self.shards, pieces, strict=True):
            for span, parts in zip(shard.spans, self._split(shard, piece), strict=True):
                for prefix, t in parts:
                    wire.setdefault(prefix + span.name, []).append(t)
        tensors: StateDict = {}
        for k, spec in self.table.items():
            if not spec.floating:
                tensors[_VALUES + k] = torch.cat(wire[_VALUES + k]).reshape(spec.shape)
                continue
            for part in self.spec.parts:
                t = torch.cat(wire[part.prefix + k])
                tensors[part.prefix + k] = t.reshape(spec.shape) if part.per_block == 0 else t
        return codec.pack(tensors, self.spec)

    def read(self, index: int, piece: bytes | bytearray | memoryview) -> StateDict:
        """The change slices piece ``index`` carries, by span key: floating ones decoded in
        their compute dtype (as :func:`lightning_drift.codec.decode` gives them), buffers as
        their values; ``SessionError(code="bad_upload")`` names what is wrong with a bad one."""
        shard = self._shard(index)
        out: StateDict = {}
        for span, parts in zip(shard.spans, self._split(shard, piece), strict=True):
            values = dict(parts)
            if not span.floating:
                out[span.key] = values[_VALUES]
                continue
            try:
                x = self.spec.decode(values, span.numel)
            except ValueError as exc:
                raise _bad(f"{span.name[:80]!r} {exc}") from None
            out[span.key] = x.to(codec.compute_dtype(span.dtype))
        return out

    def write(self, index: int, wire: Mapping[str, torch.Tensor]) -> bytes:
        """Piece ``index`` from the wire tensors of a slice dict, keyed as
        :func:`lightning_drift.codec.encode` keys a state dict's (``codes/<span key>``, ...)."""
        shard = self._shard(index)
        return self._piece(shard, {k: v for k, v in wire.items()}, by_key=True)

    # ---- slices of whole state dicts --------------------------------------------------------

    def slices(self, index: int, sd: Mapping[str, torch.Tensor]) -> StateDict:
        """Shard ``index``'s slices of the whole state dict ``sd`` (flat views, no copy)."""
        return {
            s.key: sd[s.name].detach().reshape(-1)[s.start : s.stop]
            for s in self._shard(index).spans
        }

    def assemble(self, parts: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
        """Whole tensors (in the table's order and shapes) from every shard's slices, as
        :meth:`read` or :meth:`slices` give them, one mapping per shard in shard order."""
        if len(parts) != self.count:
            raise _bad(f"{len(parts)} shards' slices for a plan of {self.count} shards")
        chunks: dict[str, list[torch.Tensor]] = {}
        for shard, part in zip(self.shards, parts, strict=True):
            for span in shard.spans:
                chunks.setdefault(span.name, []).append(part[span.key].reshape(-1))
        return {k: torch.cat(chunks[k]).reshape(spec.shape) for k, spec in self.table.items()}

    def split(self, sd: Mapping[str, torch.Tensor]) -> list[StateDict]:
        """A state dict keyed by (some of) the model's names, such as DiLoCo's momentum or a
        residual, as per-shard slice dicts (copies); names not in it are left out."""
        return [
            {
                s.key: sd[s.name].detach().reshape(-1)[s.start : s.stop].clone()
                for s in shard.spans
                if s.name in sd
            }
            for shard in self.shards
        ]

    def merge(self, parts: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
        """The inverse of :meth:`split`: whole tensors of every name all of whose spans are
        in ``parts`` (a name with some spans only is an error: the parts do not fit)."""
        chunks: dict[str, list[torch.Tensor]] = {}
        counts: dict[str, int] = {}
        for shard, part in zip(self.shards, parts, strict=True):
            for span in shard.spans:
                counts[span.name] = counts.get(span.name, 0) + 1
                if span.key in part:
                    chunks.setdefault(span.name, []).append(part[span.key].reshape(-1))
        partial = [k for k, v in chunks.items() if len(v) != counts[k]]
        if partial:
            raise SessionError(f"slices of {partial[0][:80]!r} are missing", code="bad_state")
        return {
            k: torch.cat(chunks[k]).reshape(self.table[k].shape) for k in self.table if k in chunks
        }

    # ---- internals --------------------------------------------------------------------------

    def _shard(self, index: int) -> Shard:
        if not 0 <= index < self.count:
            raise _bad(f"shard {index} is not one of this plan's {self.count}")
        return self.shards[index]

    def _piece(
        self, shard: Shard, wire: Mapping[str, torch.Tensor], *, by_key: bool = False
    ) -> bytes:
        out = bytearray()
        for s in shard.spans:
            name = s.key if by_key else s.name
            if not s.floating:
                v = wire[_VALUES + name].reshape(-1)
                out += raw_bytes(v if by_key else v[s.start : s.stop])
                continue
            for part in self.spec.parts:
                v = wire[part.prefix + name].reshape(-1)
                if not by_key and part.per_block == 0:
                    v = v[s.start : s.stop]
                elif not by_key:
                    first = s.start // self.block * part.per_block
                    v = v[first : first + self.spec.count(part, s.numel)]
                out += raw_bytes(v)
        if len(out) != shard.size:
            raise _bad(f"piece {shard.index} came out as {len(out)} bytes, not {shard.size}")
        return bytes(out)

    def _split(
        self, shard: Shard, piece: bytes | bytearray | memoryview
    ) -> list[list[tuple[str, torch.Tensor]]]:
        """Each span's wire tensors (prefix, flat tensor) out of a piece, checked."""
        buf = bytes(piece)
        if len(buf) != shard.size:
            raise _bad(
                f"piece {shard.index} is {len(buf)} bytes; the plan's is {shard.size} "
                "(another model, codec or shard count?)"
            )
        out: list[list[tuple[str, torch.Tensor]]] = []
        at = 0
        for s in shard.spans:
            parts: list[tuple[str, torch.Tensor]] = []
            if not s.floating:
                v, at = from_raw(buf, at, s.dtype, s.numel)
                if s.dtype == torch.bool and bool((v.view(torch.uint8) > 1).any()):
                    raise _bad(f"bool buffer {s.name[:80]!r} holds bytes other than 0 and 1")
                parts.append((_VALUES, v))
            else:
                for part in self.spec.parts:
                    v, at = from_raw(buf, at, part.dtype, self.spec.count(part, s.numel))
                    parts.append((part.prefix, v))
                try:  # the values' own checks (finite scales, ...), before any is used
                    self.spec.decode(dict(parts), s.numel)
                except ValueError as exc:
                    raise _bad(f"{s.name[:80]!r} {exc}") from None
            out.append(parts)
        return out


def span_bytes(span: Span, spec: Spec) -> int:
    """Bytes of ``span`` in a piece of codec ``spec``."""
    if not span.floating:
        return span.numel * span.dtype.itemsize
    return spec.nbytes(span.numel)


def _cut(table: Mapping[str, TensorSpec], spec: Spec, count: int) -> tuple[Shard, ...]:
    """The byte-balanced shards (see the module docstring), in closed form per tensor: a
    tensor's full blocks all cost the same, so where its blocks cross a shard's boundary is
    a division, however large the model."""
    block = spec.block
    unit = spec.nbytes(block)  # one full block's bytes
    spans: list[list[Span]] = [[] for _ in range(count)]
    total = 0
    costs: list[tuple[str, TensorSpec, int]] = []
    for name, t in table.items():
        whole = span_bytes(Span(name, 0, t.numel, t.dtype), spec) if t.floating else t.nbytes
        costs.append((name, t, total))
        total += whole
    for name, t, offset in costs:
        if not t.floating or t.numel == 0:  # a buffer, or an empty tensor: one span
            spans[_owner(offset, total, count)].append(Span(name, 0, t.numel, t.dtype))
            continue
        blocks = math.ceil(t.numel / block)
        first = _owner(offset, total, count)
        last = _owner(offset + (blocks - 1) * unit, total, count)
        start_block = 0
        for j in range(first, last + 1):
            # The first block of this tensor owned by shard j + 1: the smallest i with
            # (offset + i·unit)·count >= (j + 1)·total.
            end_block = (
                blocks if j == last else -(-((j + 1) * total - offset * count) // (unit * count))
            )
            end_block = min(blocks, max(start_block, end_block))
            if end_block > start_block:
                stop = min(t.numel, end_block * block)
                spans[j].append(Span(name, start_block * block, stop, t.dtype))
            start_block = end_block
    return tuple(
        Shard(j, tuple(ss), sum(span_bytes(s, spec) for s in ss)) for j, ss in enumerate(spans)
    )


def _owner(byte: int, total: int, count: int) -> int:
    """The shard whose byte range holds ``byte`` of ``total``."""
    return min(count - 1, byte * count // max(1, total))


def _bad(what: str) -> SessionError:
    return SessionError(
        f"bad piece of a sharded change: {what}; every node must train the same model with the "
        "same lightning-drift version",
        code="bad_upload",
    )


__all__ = ["MAX_SHARDS", "Shard", "ShardPlan", "Span", "span_bytes"]
