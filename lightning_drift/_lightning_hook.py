"""Register ``DriftStrategy`` as ``"drift"`` with Lightning, whichever is imported first.

``Trainer(strategy="drift")`` looks the name up in Lightning's ``StrategyRegistry``, which
only knows strategies whose module has been imported. Importing the strategy from
``lightning_drift/__init__.py`` would make every ``import lightning_drift`` pay for Lightning
(seconds), and the coordinator and the CLI do not need it. Lightning offers no entry point
for strategies (its entry points are for callbacks, read after the strategy is resolved), so:

- when Lightning's ``lightning.pytorch.strategies`` is already loaded, :func:`install`
  imports ``lightning_drift.node.strategy`` at once, which registers the name;
- otherwise it puts a one-shot finder at the front of ``sys.meta_path``. It answers only for
  ``lightning.pytorch.strategies``: it removes itself, lets the normal machinery find that
  module, and wraps its loader so that ``lightning_drift.node.strategy`` is imported right
  after the module has run. Every other import passes through untouched.

Set ``DRIFT_LIGHTNING_HOOK=0`` to leave ``sys.meta_path`` alone (e.g. next to other import
hooks). Then, when Lightning is imported after ``lightning_drift``, make the name known
yourself before ``Trainer(strategy="drift")``: ``import lightning_drift.node.strategy``, or
pass ``lightning_drift.DriftStrategy(...)`` instead of the name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

ENV = "DRIFT_LIGHTNING_HOOK"
TARGET = "lightning.pytorch.strategies"
STRATEGY_MODULE = "lightning_drift.node.strategy"


def install() -> None:
    """Make ``"drift"`` a Lightning strategy name now or as soon as Lightning loads."""
    if TARGET in sys.modules:
        importlib.import_module(STRATEGY_MODULE)
        return
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if not any(isinstance(f, _RegisterAfterLightning) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLightning())


def _register() -> None:
    try:
        importlib.import_module(STRATEGY_MODULE)
    except Exception as exc:  # never break `import lightning` for its other users
        warnings.warn(
            f'lightning_drift could not register the "drift" strategy with Lightning: {exc!r}; '
            f"`import {STRATEGY_MODULE}` shows the full error",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterAfterLightning(importlib.abc.MetaPathFinder):
    """Finds nothing itself; for ``TARGET`` it wraps the real loader to register afterwards."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot, and the lookup below must not find us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register()

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec
