"""The trust boundary: everything a node sends passes here before anything else sees it. Pure.

A node token lets its holder send any well-formed message, so every message from a node is
checked, bounded and cleaned here, once, by the server as it arrives; the session, the
scheduler, the rounds, the logs and the live view then trust what they get:

- **Numbers** are finite and clamped to the ranges below (a value outside is clamped, not
  refused, unless no sane value can stand in for it: a dataset size of 0, a fingerprint that
  is not a sha256).
- **Strings** lose control and format characters (escape sequences, newlines, bidi overrides)
  and are cut to a length limit.
- **Lists** are cut (at most :data:`DEVICES_MAX` devices).
- **Rates** a node reports about itself are bounded by what the coordinator has measured
  (:func:`bound_pace`, :data:`PACE_FACTOR`).
- **Uploads** are checked from the header of their safetensors blob against the model the
  session knows (:class:`UploadCheck`) before their body is read.

Ranges (inclusive):

==========================  ===================================================
field                       range
==========================  ===================================================
names, hostnames            :data:`NAME_MAX` characters
other texts                 :data:`TEXT_MAX` characters (codes: :data:`CODE_MAX`)
rounds, epochs, steps       0 … :data:`ROUND_MAX` (-1 where the field allows "none")
samples, bytes, dataset     0 … :data:`COUNT_MAX` (a dataset size must be ≥ 1)
cpu_count                   1 … :data:`CPU_COUNT_MAX`
calibration (GFLOP/s)       0 (unknown) or up to :data:`CALIBRATION_MAX`
samples/s                   0 (unknown) or :data:`PACE_MIN` … :data:`PACE_MAX`
train_seconds               0 (unknown) or :data:`TRAIN_S_MIN` … :data:`TRAIN_S_MAX`
loss                        finite, ``|loss|`` ≤ :data:`LOSS_MAX`, else none
==========================  ===================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec

from lightning_drift import codec, modelspec
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.peers import parse_peer
from lightning_drift.protocol import (
    BarrierSync,
    DeviceInfo,
    Join,
    NodeInfo,
    ShardRequest,
    StopRequest,
    TrainProgress,
)
from lightning_drift.text import clean_text as _clean
from lightning_drift.text import is_hex64

NAME_MAX = 64
TEXT_MAX = 200
CODE_MAX = 32
DEVICES_MAX = 16
ROUND_MAX = (1 << 31) - 1
COUNT_MAX = 1 << 40  # about 10^12: samples, bytes of memory or VRAM, dataset size
CPU_COUNT_MAX = 4096
CALIBRATION_MAX = 1e6  # GFLOP/s: an exaflop/s machine is far beyond any node
PACE_MIN = 1e-3  # samples/s
PACE_MAX = 1e7
TRAIN_S_MIN = 1e-3  # seconds
TRAIN_S_MAX = 30 * 86400.0
LOSS_MAX = 1e30
# A pace a node reports is believed within this factor of what the coordinator measured of
# it (or, before that, of the session's median measured node); a new node's share of an
# epoch is at most this factor of the median node's.
PACE_FACTOR = 4.0


class BadInput(SessionError):
    """A message from a node that no clamping can make sane (code ``bad_input``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "bad_input")


def clean_text(text: object, limit: int = TEXT_MAX) -> str:
    """:func:`lightning_drift.text.clean_text` with the boundary's default limit."""
    return _clean(text, limit)


def clamp_int(value: int, lo: int, hi: int) -> int:
    return lo if value < lo else hi if value > hi else int(value)


def clamp_float(value: float, lo: float, hi: float, unknown: float = 0.0) -> float:
    """``value`` clamped to [lo, hi]; ``unknown`` when it is not a positive finite number."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        return unknown
    return min(hi, max(lo, float(value)))


def loss(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or abs(value) > LOSS_MAX:
        return None
    return float(value)


def finite(value: float, default: float = 0.0) -> float:
    """``value`` if it is finite, else ``default`` (for numbers shown to observers)."""
    return float(value) if math.isfinite(value) else default


# ---- messages ------------------------------------------------------------------------------


def join(msg: Join) -> Join:
    """A Join with its name cleaned (the token is the verifier's to check)."""
    return msgspec.structs.replace(
        msg,
        name=clean_text(msg.name, NAME_MAX),
        drift_version=clean_text(msg.drift_version, CODE_MAX),
        resume_round=clamp_int(msg.resume_round, -1, ROUND_MAX),
    )


def node_info(msg: NodeInfo) -> NodeInfo:
    """NodeInfo cleaned and bounded; :class:`BadInput` for a dataset size below 1 or a model
    fingerprint that is not a sha256 (64 hex digits)."""
    if not 1 <= msg.dataset_size <= COUNT_MAX:
        raise BadInput(
            f"NodeInfo.dataset_size {msg.dataset_size} is not a dataset size (1 … {COUNT_MAX})"
        )
    fp = msg.model_fingerprint.lower()
    if not is_hex64(fp):
        raise BadInput(
            "NodeInfo.model_fingerprint must be the sha256 of the model's tensor table (64 hex "
            f"digits), got {clean_text(msg.model_fingerprint, 20)!r}: update the node's "
            "lightning-drift"
        )
    return msgspec.structs.replace(
        msg,
        nonce=clean_text(msg.nonce, CODE_MAX),
        devices=[_device(d) for d in msg.devices[:DEVICES_MAX]],
        train_device=clean_text(msg.train_device, CODE_MAX),
        cpu=clean_text(msg.cpu, TEXT_MAX),
        cpu_count=clamp_int(msg.cpu_count, 1, CPU_COUNT_MAX),
        memory=clamp_int(msg.memory, 0, COUNT_MAX),
        calibration=clamp_float(msg.calibration, 0.0, CALIBRATION_MAX),
        torch_version=clean_text(msg.torch_version, CODE_MAX),
        model_fingerprint=fp,
        hostname=clean_text(msg.hostname, NAME_MAX),
        name=clean_text(msg.name, NAME_MAX),
        batch_size=clamp_int(msg.batch_size, 0, COUNT_MAX),
        samples_per_step=clamp_int(msg.samples_per_step, 0, COUNT_MAX),
        data_peer=_data_peer(msg.data_peer),
    )


DATA_PEER_MAX = 1024  # characters of a data endpoint's name (a ticket is about 200)


def _data_peer(text: str) -> str:
    """A node's data endpoint as it named it, or "" when that is no peer name
    (``peers.parse_peer``: ``ID@HOST:PORT`` or a ticket)."""
    if not text or len(text) > DATA_PEER_MAX:
        return ""
    try:
        return parse_peer(text).text
    except ConfigError:
        return ""


def _device(d: DeviceInfo) -> DeviceInfo:
    return DeviceInfo(
        name=clean_text(d.name, NAME_MAX),
        kind=clean_text(d.kind, CODE_MAX),
        vram_total=clamp_int(d.vram_total, 0, COUNT_MAX),
        vram_free=clamp_int(d.vram_free, 0, COUNT_MAX),
        compute_capability=None
        if d.compute_capability is None
        else clean_text(d.compute_capability, CODE_MAX),
        index=clamp_int(d.index, 0, 1024),
        usable=bool(d.usable),
    )


def progress(msg: TrainProgress) -> TrainProgress:
    return TrainProgress(
        round=clamp_int(msg.round, 0, ROUND_MAX),
        epoch=clamp_int(msg.epoch, 0, ROUND_MAX),
        step=clamp_int(msg.step, 0, COUNT_MAX),
        samples=clamp_int(msg.samples, 0, COUNT_MAX),
        loss=loss(msg.loss),
        samples_per_s=clamp_float(msg.samples_per_s, PACE_MIN, PACE_MAX),
        vram_used=clamp_int(msg.vram_used, 0, COUNT_MAX),
        data_bytes=clamp_int(msg.data_bytes, 0, COUNT_MAX),
        vram_peak=clamp_int(msg.vram_peak, 0, COUNT_MAX),
        epoch_samples=clamp_int(msg.epoch_samples, -1, COUNT_MAX),
    )


def barrier_sync(msg: BarrierSync) -> BarrierSync:
    return BarrierSync(
        round=clamp_int(msg.round, -1, ROUND_MAX),
        epoch=clamp_int(msg.epoch, 0, ROUND_MAX),
        samples=clamp_int(msg.samples, 0, COUNT_MAX),
        steps=clamp_int(msg.steps, 0, COUNT_MAX),
        loss=loss(msg.loss),
        delta=bool(msg.delta),
        train_seconds=clamp_float(msg.train_seconds, TRAIN_S_MIN, TRAIN_S_MAX),
        base_round=clamp_int(msg.base_round, -1, ROUND_MAX),
        # Not a sha256: the node names no weights (it gets the whole weights back, and a
        # delta naming no base is taken as a change from the current global weights).
        base_sha256=msg.base_sha256.lower() if is_hex64(msg.base_sha256.lower()) else "",
        epoch_samples=clamp_int(msg.epoch_samples, -1, COUNT_MAX),
        whole=bool(msg.whole),
    )


def stop_request(msg: StopRequest) -> StopRequest:
    """A stop request's reason becomes one clean, bounded line; counts are clamped."""
    return StopRequest(
        kind=msg.kind,
        reason=clean_text(msg.reason),
        epoch=clamp_int(msg.epoch, 0, ROUND_MAX),
        step=clamp_int(msg.step, 0, COUNT_MAX),
    )


def shard_request(msg: ShardRequest) -> ShardRequest:
    return ShardRequest(epoch=clamp_int(msg.epoch, 0, ROUND_MAX))


def bounded(raw: msgspec.Struct, clean: msgspec.Struct) -> list[str]:
    """What the boundary changed in a message, for the log: ``"calibration 1e+308 → 1e+06"``,
    ``"name cleaned"``, ``"devices cut to 16"``; empty when nothing was changed."""
    out = []
    for f in msgspec.structs.fields(type(clean)):
        a, b = getattr(raw, f.name, None), getattr(clean, f.name)
        if a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
            continue
        if isinstance(b, str):
            out.append(f"{f.name} cleaned")
        elif isinstance(b, list):
            out.append(
                f"{f.name} cut to {len(b)}" if len(b) < len(a or ()) else f"{f.name} cleaned"
            )
        else:
            out.append(f"{f.name} {_show(a)} → {_show(b)}")
    return out


def _show(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else clean_text(repr(v), 24)


def peer_text(text: str) -> str:
    """A reason or message a node sends (Bye, Error): cleaned for logs and the view."""
    return clean_text(text, TEXT_MAX)


# ---- paces ---------------------------------------------------------------------------------


def bound_pace(pace: float, around: float | None, factor: float = PACE_FACTOR) -> float:
    """A pace (samples/s) within ``factor`` of ``around`` (what the coordinator measured), or
    within the absolute range when nothing is measured yet; 0 stays 0 (unknown)."""
    if not (math.isfinite(pace) and pace > 0):
        return 0.0
    if around is not None and around > 0:
        return min(around * factor, max(around / factor, pace))
    return min(PACE_MAX, max(PACE_MIN, pace))


# ---- uploads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadCheck:
    """Checks an upload from the start of its blob, before the body is read.

    Called (by the transport) with the bytes received so far and the blob's declared size;
    returns how many bytes it needs before it can decide, 0 once the header is good.
    SessionError(code="bad_upload") when it is not:

    - a compact change (``codec.pack``, what nodes send with a codec) must be a ``delta`` and
      have exactly the size its codec makes of the model's ``table``;
    - a safetensors blob's tensor table must be the model's (``table``, after round 0) or have
      its fingerprint (``fingerprint``, before), and its size be what its header implies. With
      ``delta``, floating tensors may travel in any floating dtype, and a compressed change
      (``codec``) must have the codec's layout of the model's table.
    """

    fingerprint: str
    table: modelspec.Table | None = None
    delta: bool = False

    def __call__(self, prefix: bytes | bytearray | memoryview, size: int) -> int:
        if size == 0 and self.table is None:
            # A node that believed the session had weights sent none at its start-up sync.
            raise SessionError(
                "this coordinator has no global weights yet: send the start-up weights",
                code="need_weights",
            )
        if len(prefix) < len(codec.COMPACT) <= size:
            return len(codec.COMPACT)
        if codec.is_compact(prefix):
            return self._compact(prefix, size)
        need = modelspec.header_needs(prefix)
        if need > size:
            raise SessionError(
                f"upload's safetensors header ({need} bytes) is longer than the blob "
                f"({size} bytes)",
                code="bad_upload",
            )
        if len(prefix) < need:
            return need
        header = modelspec.read_header(prefix)
        if self.table is not None:
            spec = header.metadata.get(codec.META_CODEC, "") if self.delta else ""
            if spec:
                # A compressed change: its table is the codec's layout of the model's.
                why = modelspec.compare(
                    codec.payload_table(self.table, spec), header.table, any_float=True
                )
            else:
                why = modelspec.compare(self.table, header.table, any_float=self.delta)
            if why:
                raise SessionError(
                    f"upload is not the session's model: {why}; every node must train the "
                    "same model",
                    code="bad_upload",
                )
        elif modelspec.fingerprint(header.table) != self.fingerprint:
            raise SessionError(
                "start-up weights are not the model the nodes announced (their tensor table's "
                f"fingerprint is {modelspec.fingerprint(header.table)[:12]}…, the session's "
                f"{self.fingerprint[:12]}…); every node must build the same model",
                code="bad_upload",
            )
        if header.size != size:
            raise SessionError(
                f"upload's safetensors header implies {header.size} bytes, the blob has {size}",
                code="bad_upload",
            )
        return 0

    def _compact(self, prefix: bytes | bytearray | memoryview, size: int) -> int:
        """A compact change (``codec.pack``): a change from the global weights only, whose
        size is what its codec makes of the model's table."""
        if self.table is None or not self.delta:
            raise SessionError(
                "a compact change where whole weights were due (the start-up sync, or a node "
                "without the global weights): send the weights",
                code="bad_upload",
            )
        need = codec.compact_needs(prefix)
        if need > size:
            raise SessionError(
                f"upload's compact header ({need} bytes) is longer than the blob ({size} bytes)",
                code="bad_upload",
            )
        if len(prefix) < need:
            return need
        spec = codec.compact_spec(prefix)
        expected = codec.compact_size(self.table, spec)
        if expected != size:
            raise SessionError(
                f"upload is not the session's model: a compact {spec} change of it is "
                f"{expected} bytes, the blob has {size}; every node must train the same model",
                code="bad_upload",
            )
        return 0


__all__ = [
    "CALIBRATION_MAX",
    "NAME_MAX",
    "PACE_FACTOR",
    "PACE_MAX",
    "PACE_MIN",
    "TEXT_MAX",
    "BadInput",
    "UploadCheck",
    "barrier_sync",
    "bound_pace",
    "bounded",
    "clean_text",
    "finite",
    "join",
    "node_info",
    "peer_text",
    "progress",
    "shard_request",
]
