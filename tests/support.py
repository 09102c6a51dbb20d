"""Small builders shared by the coordinator tests (protocol-level clients, no Lightning)."""

from __future__ import annotations

import torch

from lightning_drift import codec
from lightning_drift.aggregate import Accumulator, DiLoCo, to_bytes
from lightning_drift.protocol import NodeInfo


def node_info(dataset_size: int = 1000) -> NodeInfo:
    """A CPU node's NodeInfo for a dataset of ``dataset_size`` samples."""
    return NodeInfo(
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
