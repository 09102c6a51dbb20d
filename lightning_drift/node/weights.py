"""The node's weights on their way to and from the coordinator.

- :func:`model_fingerprint`: what the coordinator compares to tell that every node builds the
  same model;
- :class:`GlobalWeights`: the upload payload of a barrier (the full state dict, or its bf16
  change since the global weights the node holds) and the check of the round's answer;
- :func:`load_in_place`: copy the global weights into the existing parameters and buffers;
- :func:`snapshot` and :func:`apply_in_place`: an overlapped round's hand-off: a copy of the
  weights at the barrier, and later ``global + (weights now - that copy)``, in place;
- :func:`keep_round_copy`: the node's own copy of a round's global weights on disk.

Torch only: no Lightning, no network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.checkpoint import weights_name
from lightning_drift.errors import ConfigError
from lightning_drift.fsutil import atomic_write, sha256_bytes
from lightning_drift.protocol import TransferDType

StateDict = dict[str, torch.Tensor]


def model_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the state dict's names, shapes and dtypes: equal models, equal fingerprints."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()


def local_state(module: torch.nn.Module) -> StateDict:
    """The module's state dict, detached from autograd (the tensors themselves, not copies)."""
    return {k: v.detach() for k, v in module.state_dict().items()}


def load_in_place(module: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the module's existing parameters and buffers.

    ``load_state_dict`` copies into the existing tensors: parameters keep their identity, so
    the optimizer's state keeps pointing at them (the local optimizer carries on across
    rounds, as in DiLoCo). Every name must match (``strict``)."""
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
) -> None:
    """Fold the global weights of a round into a module that trained on meanwhile.

    ``taken`` is the :func:`snapshot` uploaded for the round and ``weights`` its answer; every
    parameter and buffer becomes ``weights + (now - taken)``: the round's result plus the
    steps taken since the snapshot, so no local step is lost and none is counted twice (the
    next upload holds them). Bool buffers take ``weights`` as they are. Done in place, under
    ``no_grad``: parameters keep their identity and the optimizer its state. Tensors that
    share memory (tied weights) are changed once. Call it between optimizer steps.
    """
    state = module.state_dict()
    if state.keys() != weights.keys() or state.keys() != taken.keys():
        missing = sorted(set(state) ^ set(weights) | set(state) ^ set(taken))
        raise ConfigError(
            f"global weights and this model differ in {', '.join(missing[:5])}: every node "
            "must train the same model"
        )
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    with torch.no_grad():
        for name, t in state.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if t.numel() and key in seen:
                continue
            seen.add(key)
            g = weights[name].to(device=t.device, dtype=t.dtype)
            if t.dtype == torch.bool:
                t.copy_(g)
            else:
                t.sub_(taken[name]).add_(g)


def keep_round_copy(directory: Path, held_round: int, blob: bytes) -> Path:
    """Write the global weights of ``held_round`` to ``directory`` (atomically), named as the
    coordinator names its checkpoints; returns the file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / weights_name(held_round)
    atomic_write(path, blob)
    return path


@dataclass(frozen=True)
class Upload:
    """A barrier's payload: safetensors bytes, and whether they are a delta against the
    global weights of ``base_round``."""

    payload: bytes
    delta: bool = False
    base_round: int = -1


class GlobalWeights:
    """The global weights the node holds, as far as uploads need them.

    With ``transfer_dtype="bfloat16"`` a copy of the last global weights is kept on the CPU and
    uploads after the start-up sync carry ``local - global`` in bfloat16 (half the bytes of
    float32 weights, and small numbers that bfloat16 rounds less). Otherwise uploads are the
    full state dict and nothing is kept.
    """

    def __init__(self, transfer_dtype: TransferDType = "float32") -> None:
        self.transfer_dtype = transfer_dtype
        self.held_round = -1  # the round of the last global weights received
        self._kept: StateDict | None = None  # a CPU copy of them, for deltas

    def upload(self, local: Mapping[str, torch.Tensor], contributing_round: int) -> Upload:
        """The payload for a barrier of ``contributing_round`` (0: the start-up sync, always
        the full weights)."""
        if contributing_round > 0 and self.transfer_dtype == "bfloat16" and self._kept is not None:
            kept = self._kept
            delta = {
                # The kept copy lives on the CPU, where the blob is decoded.
                k: (v.float().cpu() - kept[k].float()).to(torch.bfloat16)
                if v.is_floating_point()
                else v
                for k, v in local.items()
            }
            return Upload(to_bytes(delta), delta=True, base_round=self.held_round)
        return Upload(to_bytes(local))

    def receive(self, held_round: int, blob: bytes, sha256: str) -> StateDict:
        """Check and decode the global weights of ``held_round``; keep them for deltas."""
        if sha256_bytes(blob) != sha256:
            raise ConfigError(f"global weights of round {held_round} do not match their checksum")
        weights = from_bytes(blob)
        self.held_round = held_round
        if self.transfer_dtype == "bfloat16":
            self._kept = {k: v.clone() for k, v in weights.items()}
        return weights


__all__ = [
    "GlobalWeights",
    "StateDict",
    "Upload",
    "keep_round_copy",
    "apply_in_place",
    "load_in_place",
    "local_state",
    "model_fingerprint",
    "snapshot",
]
