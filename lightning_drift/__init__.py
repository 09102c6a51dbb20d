"""lightning-drift: train one model across unlike machines, averaging weights at barriers."""

from __future__ import annotations

__version__ = "0.1.0"

from lightning_drift import _lightning_hook  # noqa: E402
from lightning_drift.errors import (  # noqa: E402
    AuthError,
    ConfigError,
    ConnectTimeout,
    DriftError,
    PeerLost,
    ProtocolError,
    SessionError,
    SessionFinished,
)

__all__ = [
    "AuthError",
    "ConfigError",
    "ConnectTimeout",
    "DriftError",
    "DriftStrategy",
    "PeerLost",
    "ProtocolError",
    "SessionError",
    "SessionFinished",
    "__version__",
]


def __getattr__(name: str):
    # Importing Lightning costs seconds; the coordinator and the CLI must not pay for it.
    if name == "DriftStrategy":
        from lightning_drift.node.strategy import DriftStrategy

        return DriftStrategy
    raise AttributeError(name)


# Makes Trainer(strategy="drift") work without importing Lightning here; see the module.
_lightning_hook.install()
