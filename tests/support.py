"""Small builders shared by the coordinator tests (protocol-level clients, no Lightning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_drift import codec
from lightning_drift.aggregate import Accumulator, DiLoCo, to_bytes
from lightning_drift.modelspec import TensorSpec
from lightning_drift.protocol import NodeInfo


def node_info(dataset_size: int = 1000, fingerprint: str = "") -> NodeInfo:
    """A CPU node's NodeInfo for a dataset of ``dataset_size`` samples, training the model
    whose fingerprint is ``fingerprint`` (``modelspec.state_fingerprint`` of the weights the
    test uploads at round 0; the coordinator checks them against it)."""
    return NodeInfo(
        model_fingerprint=fingerprint,
        nonce="",
        devices=[],
        train_device="cpu",
        cpu="test",
        cpu_count=1,
        memory=1 << 30,
        calibration=10.0,
        torch_version=str(torch.__version__),
        dataset_size=dataset_size,
    )


# ---- an honest session, for the tests that attack one ----------------------------------------


def small_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """The model the attack tests train: two floating tensors and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(8, 4, generator=g),
        "b": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(0, dtype=torch.int64),
    }


def small_fingerprint() -> str:
    from lightning_drift.modelspec import state_fingerprint

    return state_fingerprint(small_model())


def wire(payload: bytes, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wire tensors of a compact change (``codec.unpack``) for the model ``like``, keyed
    ``codes/<name>``, ``scales/<name>`` or ``values/<name>``."""
    table = {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in like.items()}
    return codec.unpack(payload, table)[1]


def honest_step(held: dict[str, torch.Tensor], open_round: int, index: int) -> dict:
    """What an honest node uploads for ``open_round``: the weights it holds, moved a little
    (deterministically), and 10 more batches counted."""
    g = torch.Generator().manual_seed(7919 * open_round + index)
    out = {}
    for k, v in held.items():
        if v.is_floating_point():
            out[k] = v + 0.01 * torch.randn(v.shape, generator=g)
        else:
            out[k] = v + 10
    return out


def verify_checkpoints(directory: Path) -> list[dict]:
    """Every checkpoint the manifest in ``directory`` lists: its files match their sha256 and
    its weights are finite. Returns the manifest's entries."""
    import hashlib
    import json

    from lightning_drift.aggregate import from_bytes

    entries = json.loads((directory / "manifest.json").read_text())["checkpoints"]
    assert entries, "no checkpoint in the manifest"
    for e in entries:
        data = (directory / e["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"], e["file"]
        for k, t in from_bytes(data).items():
            if t.is_floating_point():
                assert bool(torch.isfinite(t).all()), (e["file"], k)
        if e.get("outer_file"):
            outer = (directory / e["outer_file"]).read_bytes()
            assert hashlib.sha256(outer).hexdigest() == e["outer_sha256"], e["outer_file"]
    return entries


class Reference:
    """The coordinator's rounds computed here from the same uploads: the samples-weighted mean
    of the dequantized changes, the outer step, then the download change with the
    coordinator's own error feedback, applied to its copy."""

    def __init__(self, init: dict[str, torch.Tensor], dtype: str, outer: DiLoCo | None = None):
        self.glob = {k: v.clone() for k, v in init.items()}
        self.dtype = dtype
        self.outer = outer
        self.residual = codec.Residual()

    def round(self, uploads: list[tuple[bytes, float]]) -> bytes:
        acc = Accumulator(self.glob)
        for i, (payload, weight) in enumerate(uploads):
            acc.add(str(i), codec.decode(payload, self.glob), weight, delta=True)
        target = acc.mean()
        if self.outer is not None:
            target = self.outer.step(self.glob, target)
        enc = codec.encode(codec.difference(target, self.glob), self.dtype, self.residual)
        self.glob = codec.apply(self.glob, enc.applied)
        return to_bytes(self.glob)


@dataclass
class Loop:
    """Lightning's fit loop as the node's parts see it (``epochwork.Loop``), recording what
    they asked of it: a stand-in for a ``Trainer`` in tests of the epoch's work and joining."""

    epoch: int = 0
    epochs: int = 3
    batch: int = 4
    jumped: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    ended: bool = False

    def more_epochs(self) -> bool:
        return self.epoch + 1 < self.epochs

    def steps_per_epoch(self, shard_size: int) -> int:
        return -(-shard_size // self.batch)

    def jump_to_epoch(self, epoch: int) -> int:
        was, self.epoch = self.epoch, epoch
        self.jumped.append(epoch)
        return was

    def follow_epoch_length(self, batches: int) -> None:
        self.lengths.append(batches)

    def keep_fitting(self, epochs: int) -> int | None:
        return None

    def end_fit(self) -> None:
        self.ended = True

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.metrics.append(metrics)
