"""What a model is made of, as the coordinator can check it: its tensor table and fingerprint.

A model's **tensor table** maps each state-dict name to its dtype and shape. The **fingerprint**
is the sha256 of that table (names sorted, so the order in which a module lists its state dict
or a safetensors file stores its tensors does not matter): equal models, equal fingerprints.
A node announces its fingerprint in ``NodeInfo``; the coordinator computes the same one from a
state dict it holds or from the header of an uploaded safetensors blob, *before* reading the
blob's body (:func:`read_header`), so an upload of another model is refused from its first
bytes.

The table is fixed for a whole session: :func:`table_change` names what differs when a
model's tensors change during fit (a pruning reparametrisation adds ``*_orig`` and ``*_mask``),
so a node stops with that list before it builds a payload the coordinator cannot read.

**Carried tensors** (:func:`carried`): a floating tensor whose global value holds a non-finite
number is non-finite by design (an additive attention mask of ``-inf``); such tensors are
carried as they are, bit for bit: never averaged, differenced or stepped (``-inf - -inf`` is
NaN), and an upload must leave them exactly as the global weights hold them
(:func:`carried_changed` says why one that does not is refused). They are told from
divergence by the global weights alone: a tensor finite there that turns non-finite is
divergence, and the check before new global weights are written keeps every other tensor
finite, so the set cannot grow after the start-up sync. A node offers only finite
*parameters* at the start-up sync, so only buffers are ever carried.

Pure: no I/O, no clock; torch only for dtype names and the finiteness of values.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from lightning_drift.errors import SessionError

# safetensors dtype codes -> torch dtypes (those this torch build has).
_CODES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in (
        ("F64", "float64"),
        ("F32", "float32"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("I64", "int64"),
        ("I32", "int32"),
        ("I16", "int16"),
        ("I8", "int8"),
        ("U8", "uint8"),
        ("U16", "uint16"),
        ("U32", "uint32"),
        ("U64", "uint64"),
        ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
    )
    if hasattr(torch, name)
}
_LEN = struct.Struct("<Q")
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model: its dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point


Table = dict[str, TensorSpec]


def table_of(sd: Mapping[str, torch.Tensor]) -> Table:
    """The tensor table of a state dict."""
    return {k: TensorSpec(t.dtype, tuple(t.shape)) for k, t in sd.items()}


def fingerprint(table: Mapping[str, TensorSpec]) -> str:
    """sha256 over the sorted names, shapes and dtypes of ``table``."""
    h = hashlib.sha256()
    for name in sorted(table):
        spec = table[name]
        h.update(f"{name}:{spec.shape}:{spec.dtype};".encode())
    return h.hexdigest()


def state_fingerprint(sd: Mapping[str, torch.Tensor]) -> str:
    """The fingerprint of a state dict (what ``NodeInfo.model_fingerprint`` carries)."""
    return fingerprint(table_of(sd))


@dataclass(frozen=True)
class Header:
    """A safetensors blob's header: its table and the total size its offsets imply."""

    table: Table
    size: int  # 8 + header length + data bytes: what the whole blob must measure
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors' __metadata__


def header_needs(prefix: bytes | bytearray | memoryview) -> int:
    """How many leading bytes of a safetensors blob :func:`read_header` needs (the 8-byte
    length, then the JSON header); SessionError when the length is absurd."""
    if len(prefix) < _LEN.size:
        return _LEN.size
    (n,) = _LEN.unpack(bytes(prefix[: _LEN.size]))
    if n > MAX_HEADER:
        raise SessionError(
            f"upload's safetensors header claims {n} bytes, over the {MAX_HEADER}-byte limit",
            code="bad_upload",
        )
    return _LEN.size + n


def read_header(prefix: bytes | bytearray | memoryview) -> Header:
    """Parse the header of a safetensors blob from its first :func:`header_needs` bytes.

    SessionError(code="bad_upload") naming what is wrong: not JSON, an unknown dtype, a shape
    or offsets that do not add up, or tensors that overlap or leave gaps."""
    need = header_needs(prefix)
    if len(prefix) < need:
        raise SessionError("upload ends inside its safetensors header", code="bad_upload")
    try:
        doc = json.loads(bytes(prefix[_LEN.size : need]))
    except ValueError as exc:
        raise SessionError(
            f"upload's safetensors header is not JSON: {exc}", code="bad_upload"
        ) from None
    if not isinstance(doc, dict):
        raise SessionError("upload's safetensors header is not a JSON object", code="bad_upload")
    table: Table = {}
    metadata: dict[str, str] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in doc.items():
        if name == "__metadata__":
            if isinstance(entry, dict):
                metadata = {str(k)[:200]: str(v)[:200] for k, v in list(entry.items())[:64]}
            continue
        try:
            dtype = _CODES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SessionError(
                f"upload tensor {name[:80]!r} has an unreadable safetensors entry",
                code="bad_upload",
            ) from None
        spec = TensorSpec(dtype, shape)
        if any(d < 0 for d in shape) or end - begin != spec.nbytes or begin < 0:
            raise SessionError(
                f"upload tensor {name[:80]!r}: shape {shape} and offsets [{begin}, {end}) disagree",
                code="bad_upload",
            )
        table[name] = spec
        spans.append((begin, end, name))
    spans.sort()
    at = 0
    for begin, end, name in spans:
        if begin != at:
            raise SessionError(
                f"upload tensor {name[:80]!r} starts at byte {begin}, expected {at}: tensors "
                "must be packed",
                code="bad_upload",
            )
        at = end
    return Header(table, need + at, metadata)


def compare(
    want: Mapping[str, TensorSpec], got: Mapping[str, TensorSpec], *, any_float: bool = False
) -> str | None:
    """Why the tensor table ``got`` is not the model ``want`` describes, or None.

    With ``any_float`` a floating tensor may travel in any floating dtype (deltas, reduced
    precision)."""
    why = key_difference(want, got, "the model")
    if why:
        return why
    for name, spec in want.items():
        g = got[name]
        if g.shape != spec.shape:
            return f"tensor {name[:80]!r} has shape {g.shape}, the model has {spec.shape}"
        if g.dtype != spec.dtype and not (any_float and spec.floating and g.floating):
            return f"tensor {name[:80]!r} has dtype {g.dtype}, the model has {spec.dtype}"
    return None


def key_difference(want: Iterable[str], got: Iterable[str], model: str) -> str | None:
    """The names ``got`` lacks and the ones it has beyond ``want``, for a refusal ("missing 1
    tensor(s) of the model: 'w'; ..."); None when the names are the same."""
    want, got = list(want), list(got)
    missing = [k for k in want if k not in set(got)]
    extra = [k for k in got if k not in set(want)]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s) of {model}: {names(missing)}")
    if extra:
        parts.append(f"{len(extra)} tensor(s) not in {model}: {names(extra)}")
    return "; ".join(parts) or None


def table_change(want: Mapping[str, TensorSpec], got: Mapping[str, TensorSpec]) -> str | None:
    """What differs from the tensor table ``want`` (the session's) to ``got`` (a model now):
    the tensors added, removed and changed (dtype or shape), each as its first few names and
    a count; None when the tables are the same. Names only: no value is read."""
    added = [k for k in got if k not in want]
    removed = [k for k in want if k not in got]
    changed = [k for k, spec in want.items() if k in got and got[k] != spec]
    parts = [
        f"{len(keys)} {what} ({names(keys)})"
        for what, keys in (("added", added), ("removed", removed), ("changed", changed))
        if keys
    ]
    return "; ".join(parts) or None


def carried(sd: Mapping[str, torch.Tensor]) -> frozenset[str]:
    """The carried tensors of the global weights ``sd`` (see the module docstring): the
    floating ones holding a NaN or an infinity. Call it on the global weights, never on an
    upload: only they say what the model holds by design."""
    return frozenset(
        k for k, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` have the same dtype, shape and bytes (``-0.0`` is not ``0.0``, a NaN
    equals the same NaN): how a carried tensor is compared with the global one."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    b = b.to(a.device)
    return torch.equal(
        a.detach().reshape(-1).contiguous().view(torch.uint8),
        b.detach().reshape(-1).contiguous().view(torch.uint8),
    )


def carried_changed(name: str) -> str:
    """Why an upload that changed the carried tensor ``name`` is refused, and the fix."""
    return (
        f"buffer {name[:80]!r} holds non-finite values by design (the session carries it as "
        "the model defined it, never averaged), but it changed during training: keep such a "
        "buffer fixed during fit (register it with persistent=False to keep it out of the "
        "state dict, or compute it in forward)"
    )


def names(keys: Iterable[str], limit: int = 5) -> str:
    """The first ``limit`` names (each cut to 80 characters), then how many more."""
    keys = list(keys)
    shown = ", ".join(repr(k[:80]) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


__all__ = [
    "MAX_HEADER",
    "Header",
    "Table",
    "TensorSpec",
    "carried",
    "carried_changed",
    "compare",
    "fingerprint",
    "header_needs",
    "key_difference",
    "names",
    "read_header",
    "same_bits",
    "state_fingerprint",
    "table_change",
    "table_of",
]
