"""Which one device a node trains on, and the accelerator Lightning drives it with.

A drift node owns exactly one device: :func:`resolve_devices` turns what Lightning's
accelerator connector resolved from ``Trainer(devices=..., num_nodes=...)`` into that one
device, refusing an explicit request for several and warning when ``devices="auto"`` found
more. The boundary: device rules are the node's, apart from the hooks that receive them.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.accelerators import (
    Accelerator,
    CPUAccelerator,
    CUDAAccelerator,
    MPSAccelerator,
)

from lightning_drift.errors import ConfigError
from lightning_drift.hardware import choose_device

log = logging.getLogger(__name__)


def chosen(preference: str) -> tuple[torch.device, Accelerator | None]:
    """The root device and accelerator for ``DriftStrategy(device=preference)``: ``"auto"``
    leaves both to Lightning (CPU until it resolves one)."""
    if preference == "auto":
        return torch.device("cpu"), None
    root = choose_device(preference)
    return root, accelerator_for(root)


def accelerator_for(device: torch.device) -> Accelerator:
    if device.type == "cuda":
        return CUDAAccelerator()
    if device.type == "mps":
        return MPSAccelerator()
    return CPUAccelerator()


def explicitly_several(devices: list[torch.device]) -> bool:
    """True when several devices can only have come from an explicit ``Trainer(devices=N)``.

    ``devices="auto"`` resolves one CPU or MPS device, and every CUDA device of the machine;
    fewer than every CUDA device (or several CPUs) means the user asked for them."""
    kind = devices[0].type
    available = torch.cuda.device_count() if kind == "cuda" else 1
    return len(devices) != available


def resolve_devices(
    resolved: list[torch.device] | None, preference: str, root: torch.device
) -> tuple[torch.device, list[torch.device]]:
    """``(root device, [it])`` from the devices Lightning resolved: an explicit
    ``DriftStrategy(device=...)`` wins, else the first resolved."""
    devices = [torch.device(d) for d in (resolved or [])]
    if len(devices) > 1:
        if explicitly_several(devices):
            raise ConfigError(
                f"DriftStrategy trains on one device per machine, but the Trainer was given "
                f"{len(devices)} devices ({', '.join(map(str, devices))}). Pass devices=1; to "
                "use another GPU, start another node (`drift join`) with device='cuda:N'."
            )
        # devices="auto" on a machine with several GPUs: Lightning resolves all of them.
        log.warning(
            "the Trainer resolved %d devices (%s); a drift node trains on one: %s. Pass "
            "devices=1 to silence this; start another node with device='cuda:N' to use the "
            "others.",
            len(devices),
            ", ".join(map(str, devices)),
            root if preference != "auto" else devices[0],
        )
    if preference != "auto":
        return root, [root]
    if devices:
        root = devices[0]
    return root, devices[:1]


def refuse_num_nodes(n: int) -> None:
    if n != 1:
        raise ConfigError(
            f"Trainer(num_nodes={n}) does not apply to DriftStrategy: each machine runs its own "
            "node and joins the session with its token; leave num_nodes=1."
        )


__all__ = ["accelerator_for", "chosen", "explicitly_several", "refuse_num_nodes", "resolve_devices"]
