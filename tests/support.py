"""Small builders shared by the coordinator tests (protocol-level clients, no Lightning)."""

from __future__ import annotations

import torch

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
