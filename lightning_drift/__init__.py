"""lightning-drift: train one model across unlike machines, averaging weights at barriers."""

from __future__ import annotations

__version__ = "0.1.0"

from lightning_drift.errors import (  # noqa: E402
    AuthError,
    ConfigError,
    ConnectTimeout,
    DriftError,
    PeerLost,
    ProtocolError,
    SessionError,
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
    "__version__",
]


def __getattr__(name: str):
    # Importing Lightning costs seconds; the coordinator and the CLI must not pay for it.
    if name == "DriftStrategy":
        from lightning_drift.node.strategy import DriftStrategy

        return DriftStrategy
    raise AttributeError(name)


def _register_with_lightning() -> None:
    """Make ``Trainer(strategy="drift")`` work whether Lightning is imported before or after us.

    When Lightning is already loaded the strategy registers now; otherwise a one-shot import
    hook registers it right after ``lightning.pytorch.strategies`` finishes loading.
    """
    import importlib.abc
    import sys

    target = "lightning.pytorch.strategies"
    if target in sys.modules:
        import lightning_drift.node.strategy  # noqa: F401  (registers "drift")

        return

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target_=None):  # type: ignore[no-untyped-def]
            if fullname != target:
                return None
            sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None:
                return spec
            loader = spec.loader
            exec_module = loader.exec_module  # type: ignore[attr-defined]

            def exec_then_register(module):  # type: ignore[no-untyped-def]
                exec_module(module)
                import lightning_drift.node.strategy  # noqa: F401

            loader.exec_module = exec_then_register  # type: ignore[attr-defined]
            return spec

    sys.meta_path.insert(0, _Hook())


_register_with_lightning()
