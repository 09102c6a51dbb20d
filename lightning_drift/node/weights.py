"""The node's weights on their way to and from the coordinator.

- :func:`model_fingerprint`: what the coordinator compares to tell that every node builds the
  same model;
- :class:`GlobalWeights`: the global weights the node holds (its base round), and the two halves of a barrier
  on the node: :meth:`GlobalWeights.upload` builds the upload payload from the weights at the
  barrier (their change since the base global weights, compressed, with error feedback), and
  :meth:`GlobalWeights.receive` rebuilds the round's global weights from the base ones and
  the coordinator's answer (whole weights, a compressed change, or "the same"), checked
  against the round's sha256;
- :func:`load_in_place`: copy the global weights into the existing parameters and buffers;
- :func:`snapshot` and :func:`apply_in_place`: an overlapped round's hand-off: a copy of the
  weights at the barrier, and later ``global + (weights now - that copy)``, in place;
- :func:`keep_round_copy`: the node's own copy of a round's global weights on disk;
- :meth:`GlobalWeights.check` (each barrier, on the training thread, before any payload is
  built), :func:`load_in_place` and :func:`apply_in_place`: the model must still have the
  session's tensor table (:func:`check_table`: a pruning reparametrisation during fit adds
  and removes tensors) and its carried buffers unchanged.

Carried buffers (``modelspec.carried``: non-finite by design, such as an additive mask of
``-inf``) are never differenced or stepped here either: a change leaves them 0, an
overlapped apply takes the global value, so the node holds them bit for bit as the model
defined them. :func:`check_start` refuses non-finite *parameters* at the start-up sync, so
that only buffers are ever carried.

Torch only: no Lightning, no network. ``upload`` and ``receive`` may run on any thread (the
node's network thread included), one call at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_drift import codec
from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.checkpoint import weights_name
from lightning_drift.errors import ConfigError, DriftError
from lightning_drift.fsutil import atomic_write, sha256_bytes
from lightning_drift.modelspec import (
    Table,
    TensorSpec,
    carried,
    carried_changed,
    same_bits,
    state_fingerprint,
    table_change,
    table_of,
)
from lightning_drift.protocol import Payload, TransferDType

StateDict = dict[str, torch.Tensor]


class WeightsMismatch(DriftError):
    """The global weights a node received or rebuilt are not the round's (wrong sha256).

    Nothing was taken from them; fetch the round's whole weights instead (a start-up sync
    with an empty blob and no ``base_sha256`` answers with them)."""


def model_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the state dict's names, shapes and dtypes: equal models, equal fingerprints.

    The coordinator computes the same from the header of the node's start-up upload
    (``lightning_drift.modelspec``): the two must agree."""
    return state_fingerprint(module.state_dict())


def local_state(module: torch.nn.Module) -> StateDict:
    """The module's state dict, detached from autograd (the tensors themselves, not copies)."""
    return {k: v.detach() for k, v in module.state_dict().items()}


def check_table(local: Mapping[str, torch.Tensor], table: Mapping[str, TensorSpec]) -> None:
    """ConfigError when the tensor table (names, shapes, dtypes; no values) of the weights
    ``local`` is not the session's ``table``, naming the tensors added, removed and changed.

    Every round moves the tensors the session started with, so they must stay the same all
    through fit; a model whose tensors change (pruning's reparametrisation adds ``*_orig``
    and ``*_mask``) is stopped here, on the training thread, before a payload is built."""
    why = table_change(table, table_of(local))
    if why is not None:
        raise ConfigError(
            f"this model's tensors are no longer the session's: {why}. Every round moves the "
            "tensors the session started with, so the model's tensors (names, shapes, dtypes) "
            "must stay fixed during fit. Pruning with a reparametrisation (Lightning's "
            "ModelPruning, torch.nn.utils.prune) adds *_orig and *_mask tensors: prune before "
            "trainer.fit and make it permanent (torch.nn.utils.prune.remove), prune after fit, "
            "or apply torch.nn.utils.prune before fit and change only the masks' values during it"
        )


def check_start(module: torch.nn.Module) -> None:
    """ConfigError when a parameter of ``module`` holds a NaN or an infinity at the start-up
    sync: the session would carry it as it is (``modelspec.carried``), but only buffers may be
    non-finite by design; a parameter that is has diverged or was never finite."""
    for name, t in module.state_dict(keep_vars=True).items():
        if isinstance(t, torch.nn.Parameter) and t.is_floating_point():
            bad = int((~torch.isfinite(t.detach())).sum().item())
            if bad:
                raise ConfigError(
                    f"parameter {name[:80]!r} holds {bad} non-finite value(s) (NaN or inf) at "
                    "the start-up sync: the node's training diverged or the model was never "
                    "finite; lower its learning rate, or check its initialisation or the "
                    "checkpoint it was loaded from (only buffers may hold non-finite values)"
                )


def load_in_place(module: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the module's existing parameters and buffers.

    ``load_state_dict`` copies into the existing tensors: parameters keep their identity, so
    the optimizer's state keeps pointing at them (the local optimizer carries on across
    rounds, as in DiLoCo). The module must have the tensor table of ``weights``
    (:func:`check_table`)."""
    check_table(module.state_dict(), table_of(weights))
    with torch.no_grad():
        module.load_state_dict(weights, strict=True)


def snapshot(module: torch.nn.Module) -> StateDict:
    """A copy of the module's state dict where it lives (the weights a barrier uploads).

    Training goes on while the upload travels, so the copy must not share memory with the
    parameters. It stays on the module's device: copying there is fast, and applying the
    round's answer (:func:`apply_in_place`) needs it next to the parameters."""
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def apply_in_place(
    module: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    taken: Mapping[str, torch.Tensor],
    fixed: frozenset[str] | None = None,
) -> None:
    """Fold the global weights of a round into a module that trained on meanwhile.

    ``taken`` is the :func:`snapshot` uploaded for the round and ``weights`` its answer; every
    parameter and buffer becomes ``weights + (now - taken)``: the round's result plus the
    steps taken since the snapshot, so no local step is lost and none is counted twice (the
    next upload holds them). Bool buffers and the carried tensors of ``weights`` (``fixed``,
    computed from ``weights`` when not given) take ``weights`` as they are. Done in place,
    under ``no_grad``: parameters keep their identity and the optimizer its state. Tensors
    that share memory (tied weights) are changed once. Call it between optimizer steps; the
    module must still have the tensor table of ``weights`` (:func:`check_table`).
    """
    state = module.state_dict()
    table = table_of(weights)
    check_table(state, table)
    check_table(taken, table)
    if fixed is None:
        fixed = carried(weights)
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    with torch.no_grad():
        for name, t in state.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if t.numel() and key in seen:
                continue
            seen.add(key)
            g = weights[name].to(device=t.device, dtype=t.dtype)
            if t.dtype == torch.bool or name in fixed:
                t.copy_(g)
            else:
                t.sub_(taken[name]).add_(g)


def keep_round_copy(directory: Path, global_round: int, blob: bytes) -> Path:
    """Write the global weights of ``global_round`` to ``directory`` (atomically), named as the
    coordinator names its checkpoints; returns the file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / weights_name(global_round)
    atomic_write(path, blob)
    return path


@dataclass(frozen=True)
class Upload:
    """A barrier's payload: the bytes to upload, whether they are a change (``delta``) from
    the node's base weights, and which those are (``base_round``, ``base_sha256``; -1 and ""
    when the node holds none it could be answered against)."""

    payload: bytes
    delta: bool = False
    base_round: int = -1
    base_sha256: str = ""


@dataclass(frozen=True)
class Received:
    """The global weights of ``global_round`` as the node now holds them: ``weights`` (new CPU
    tensors) and ``blob``, exactly the bytes of the coordinator's checkpoint file; ``carried``
    names their carried tensors (``modelspec.carried``), found off the training thread."""

    round: int
    weights: StateDict
    blob: bytes
    payload: Payload = "weights"
    carried: frozenset[str] = frozenset()


class GlobalWeights:
    """The global weights the node holds, and how its changes travel (``transfer_dtype``).

    - ``"float32"``: uploads and answers are whole weights; nothing is kept between rounds.
    - ``"bfloat16"`` / ``"int8"``: a CPU copy of the base global weights is kept; after the
      start-up sync an upload is the change since them, encoded with the codec of that name
      (:mod:`lightning_drift.codec`) with the node's own error feedback (:attr:`residual`),
      and the answer is the round's change from them, rebuilt here. The copy and the residual
      cost two model-sized float32 buffers of host memory.

    The start-up sync is answered ``"same"`` when the node's own weights are the session's,
    so that a node started from the same seed or checkpoint downloads nothing.

    ``in_weights`` (the session's ``--residual weights``, compressed transfers only): what the
    codec left out of an upload is not added to the next change but to the weights the node
    trains on from (:meth:`start`), so that it does not train again towards what it could
    not send; its next change, taken from the global weights, holds it. The final round's
    weights are taken exactly.
    """

    def __init__(
        self, transfer_dtype: TransferDType = "float32", *, in_weights: bool = False
    ) -> None:
        self.transfer_dtype = transfer_dtype
        self.in_weights = in_weights and transfer_dtype in codec.CODECS
        self.base_round = -1  # the round of the last global weights received
        self.base_sha256 = ""  # their sha256 (of the checkpoint file's bytes)
        self.residual = codec.Residual()  # what compression left out of past uploads
        self._kept: StateDict | None = None  # a CPU copy of them (compressed transfers)
        self._held: tuple[str, StateDict] | None = None  # (their sha256, that copy)
        self._offered: tuple[str, StateDict, bytes] | None = None  # the start-up weights
        self.table: Table | None = None  # the session's tensor table, once weights came
        self._carried: StateDict = {}  # CPU copies of the global weights' carried tensors

    @property
    def compressed(self) -> bool:
        return self.transfer_dtype in codec.CODECS

    def held(self) -> tuple[str, StateDict] | None:
        """(sha256, tensors) of the global weights kept here (compressed transfers), or None:
        what a sharded session's seat reduces from. The tensors are never changed in place."""
        return self._held

    def check(self, local: Mapping[str, torch.Tensor]) -> None:
        """Before a barrier's payload is built, on the training thread: ConfigError when the
        weights ``local`` no longer fit the session's model: another tensor table
        (:func:`check_table`), or a carried buffer that is not as the global weights hold it.
        Nothing to check before the first global weights came."""
        if self.table is None:
            return
        check_table(local, self.table)
        for name, held in self._carried.items():
            if not same_bits(local[name].detach(), held):
                raise ConfigError(f"this node cannot upload: {carried_changed(name)}")

    def offer(self, local: Mapping[str, torch.Tensor]) -> Upload:
        """The start-up sync's payload: the node's whole weights, named by their sha256 so that
        the coordinator can answer "same" (send the payload only when it has no weights)."""
        blob = to_bytes(local)
        sha = sha256_bytes(blob)
        copy = {k: v.detach().cpu().clone() for k, v in local.items()}
        self._offered = (sha, copy, blob)
        return Upload(blob, base_round=-1, base_sha256=sha)

    def upload(self, local: Mapping[str, torch.Tensor], upload_round: int) -> Upload:
        """The payload for a barrier of ``upload_round`` from ``local``, the weights at
        the barrier: the change since the base global weights (compressed, error feedback
        added and updated), or the whole weights (float32 sessions, round 0, or no base weights).
        """
        if upload_round == 0:
            return self.offer(local)
        if self.compressed and self._kept is not None:
            change = codec.difference(local, self._kept)
            if self.in_weights:  # the residual is in the weights, hence in the change
                enc = codec.encode(change, self.transfer_dtype)
                left = {k: v - enc.applied[k] for k, v in change.items() if v.is_floating_point()}
                self.residual.load_state_dict(left)
            else:
                enc = codec.encode(change, self.transfer_dtype, self.residual)
            return Upload(enc.payload, True, self.base_round, self.base_sha256)
        return Upload(to_bytes(local), base_round=self.base_round)

    def receive(
        self,
        global_round: int,
        blob: bytes,
        sha256: str,
        *,
        payload: Payload = "weights",
        contributed: bool = True,
    ) -> Received:
        """The global weights of ``global_round`` (``sha256``) from the coordinator's answer.

        ``payload`` says what ``blob`` is (``BarrierReady.payload``): the whole weights, the
        change from the base ones, or nothing ("same": the base weights, or at the start-up
        sync the offered ones). The result is checked against ``sha256`` before anything is
        kept: :class:`WeightsMismatch` leaves the node's state as it was. ``contributed``
        False (the upload did not count) drops the error feedback of that upload.
        """
        if payload in ("weights", "chunks"):  # whole: from the coordinator, or from members
            if sha256_bytes(blob) != sha256:
                raise WeightsMismatch(
                    f"global weights of round {global_round} do not match their checksum"
                )
            weights = from_bytes(blob)
        else:
            if payload == "same":
                weights, full = self._same(sha256)
            elif payload == "delta":
                if self._kept is None:
                    raise WeightsMismatch(
                        f"round {global_round} came as a change, but this node keeps no global "
                        "weights to apply it to"
                    )
                weights = codec.apply(self._kept, codec.decode(blob, self._kept))
                full = to_bytes(weights)
            else:
                raise WeightsMismatch(f"unknown payload {payload!r} for round {global_round}")
            if sha256_bytes(full) != sha256:
                raise WeightsMismatch(
                    f"the global weights of round {global_round} rebuilt from a {payload!r} answer "
                    "do not match the round's sha256"
                )
            blob = full
        self.base_round = global_round
        self.base_sha256 = sha256
        self._offered = None
        self.table = table_of(weights)
        fixed = carried(weights)
        self._carried = {k: weights[k].clone() for k in fixed}
        if not contributed:
            self.residual.clear()
        if self.compressed:
            self._kept = {k: v.clone() for k, v in weights.items()}
            self._held = (sha256, self._kept)  # one assignment: read from another thread
        return Received(global_round, weights, blob, payload, fixed)

    def start(self, got: Received, *, final: bool) -> StateDict:
        """The weights the node trains on from after ``got``: the round's global weights,
        plus (``in_weights``, not ``final``) what its codec left out of its last upload; the
        carried tensors and integer buffers as ``got`` holds them."""
        if not self.in_weights or final or not len(self.residual):
            return got.weights
        kept = {k: self.residual.get(k) for k in got.weights if k not in got.carried}
        change = {k: v for k, v in kept.items() if v is not None}
        out = dict(got.weights)
        out.update(codec.apply({k: got.weights[k] for k in change}, change))
        return out

    def _same(self, sha256: str) -> tuple[StateDict, bytes]:
        if self._offered is not None and self._offered[0] == sha256:
            _, weights, blob = self._offered
            return {k: v.clone() for k, v in weights.items()}, blob
        if self._kept is not None and self.base_sha256 == sha256:
            weights = {k: v.clone() for k, v in self._kept.items()}
            return weights, to_bytes(weights)
        raise WeightsMismatch("answered 'same', but this node holds no weights with that sha256")


__all__ = [
    "GlobalWeights",
    "Received",
    "StateDict",
    "Upload",
    "WeightsMismatch",
    "keep_round_copy",
    "apply_in_place",
    "check_start",
    "check_table",
    "load_in_place",
    "local_state",
    "model_fingerprint",
    "snapshot",
]
