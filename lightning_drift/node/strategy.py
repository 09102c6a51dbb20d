"""``DriftStrategy``: train one model across unlike machines from a Lightning ``Trainer``.

Each machine runs one node: a single-device strategy with no torch.distributed process group.
The strategy only connects Lightning to the node's parts:

- when the train dataloader is set up (first in ``fit``), the node joins the session
  (:class:`~lightning_drift.node.runtime.NodeRuntime`), syncs to the coordinator's global
  weights (round 0 or the current round) and, every epoch, swaps the dataloader's sampler for
  the work the coordinator assigned (:class:`~lightning_drift.node.shards.ShardSampler`); when
  the coordinator re-plans the rest of the epoch, the sampler, Lightning's epoch length and the
  barrier points follow between two optimizer steps;
- after each optimizer step it counts towards its barrier points
  (:class:`~lightning_drift.node.barriers.EpochBarriers`) and, when one is due, holds it
  (:meth:`DriftStrategy.hold_barrier`) through the round engine
  (:class:`~lightning_drift.node.exchange.RoundExchange`). An **overlapped** barrier hands the
  upload off and trains on; the round's global weights are folded in between two optimizer
  steps as ``global + (weights now - copy)``. At most one round is in flight. A **blocking**
  barrier (each epoch's last, and every one with ``overlap=False``) waits for the round;
- the last barrier of the last epoch is the final one: every node ends holding the
  coordinator's final checkpoint.

Planning, apart from holding barriers:

- the node reports its batch size and samples per optimizer step when it joins, so its shards
  are whole optimizer steps and rounds are planned in optimizer steps;
- a stop is the session's (:mod:`lightning_drift.node.stopping`): until the session decides,
  Lightning is kept from ending the fit on its own; once it stops, the next barrier is the
  final one. ``Trainer(max_steps)`` is the node's own limit: at it the node asks, and unless
  the session stops it leaves (its last steps sent, the rest of its work handed on) and
  Lightning ends its fit;
- a Tuner's internal fit (``lr_find``, ``scale_batch_size``) stays local: it runs inside a tuner
  callback's ``on_fit_start``, before the fit's own, and nothing joins until that has run.

No network is touched in ``__init__``; the runtime connects in ``process_dataloader`` and
closes in ``teardown``. Every member marked ``@override`` is Lightning's contract; the rest is
the strategy's own, and delegates: joining (:mod:`~lightning_drift.node.joining`), the epoch's
work and its barriers (:mod:`~lightning_drift.node.epochwork`), the round engine
(:mod:`~lightning_drift.node.exchange`), the pace meter (:mod:`~lightning_drift.node.pace`),
stop negotiation (:mod:`~lightning_drift.node.stopping`), devices
(:mod:`~lightning_drift.node.devices`), the token (:mod:`~lightning_drift.node.token`) and
Lightning's private loop state (:mod:`~lightning_drift.node.loopstate`) each have their part.

The parameters at more length than ``__init__``'s list:

- ``token``: a token is a password: prefer the environment or a file to writing it into code
  or a config. ``token_file`` may be a copy of ``STATE_DIR/node.token``.
- ``device="auto"`` lets Lightning's accelerator pick: CUDA/ROCm, then MPS, then CPU.
- ``sync_every`` brings the epoch's barriers earlier; the number of barriers is still the
  coordinator's and the epoch's last barrier always stays on its last step.
- ``mode=None`` uses the mode the token names (``"local"`` for an older token that names
  none); ``relay_urls`` default to the token's (iroh's own when it names none).
- ``coordinator_addr`` reaches a coordinator behind a forwarded port, a proxy or a new IP.
- ``peer``: ``"ID"`` is found by discovery (internet mode). Without a token the node joins
  without one (the coordinator lists its id in ``--peers``); with ``listen`` it waits for this
  coordinator; with a token, the token must name it.
- ``listen``: the node logs its id and ticket (give either to the coordinator's ``--peers``).
- ``key_file``: the coordinator knows a tokenless node by this key; a node that joins with a
  token uses a fresh key each run.
- ``overlap=True``: a barrier hands the upload to the network and training goes on; only each
  epoch's last barrier blocks (``drift-coord serve --overlap/--no-overlap``, on by default).
- :attr:`DriftStrategy.timing`: seconds the strategy kept training from running, by cause
  (start-up, waiting for rounds, hand-offs, applying weights, following re-plans).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jsonargparse.typing import SecretStr
from lightning.pytorch.callbacks import BatchSizeFinder, Callback, LearningRateFinder
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_drift import protocol as p
from lightning_drift.auth import TOKEN_ENV
from lightning_drift.errors import SessionFinished
from lightning_drift.node import devices, loopstate, schedules
from lightning_drift.node.epochwork import EpochWork
from lightning_drift.node.exchange import BarrierRecord, InFlight
from lightning_drift.node.joining import Joining, Shape, Way, ways_in
from lightning_drift.node.pace import PaceMeter
from lightning_drift.node.shards import ShardSampler, map_style
from lightning_drift.node.stopping import StopNegotiation

if TYPE_CHECKING:
    # A real import of these would run inside Lightning's own package import (see
    # lightning_drift/_lightning_hook.py); the runtime, and with it iroh, loads when a node
    # joins, not whenever Lightning does.
    from lightning.pytorch import LightningModule, Trainer

    from lightning_drift.node.runtime import Delivery, NodeRuntime
    from lightning_drift.node.weights import Received

log = logging.getLogger(__name__)


class DriftStrategy(SingleDeviceStrategy):
    """Lightning strategy for one node of a drift session (one device per machine): members
    marked ``@override`` are Lightning's contract, the rest delegates to the node's parts.
    After ``fit``, :attr:`history` has a ``BarrierRecord`` per barrier."""

    strategy_name = "drift"

    def __init__(
        self,
        token: SecretStr | str | None = None,
        device: str = "auto",
        sync_every: int | None = None,
        connect_timeout: float = 30.0,
        reconnect_timeout: float = 300.0,
        mode: str | None = None,
        relay_urls: list[str] | None = None,
        coordinator_addr: str | None = None,
        checkpoint_dir: str | None = None,
        name: str | None = None,
        progress_every: float | None = None,
        calibration_seconds: float = 0.5,
        token_file: str | None = None,
        peer: str | None = None,
        listen: str | None = None,
        key_file: str | None = None,
        overlap: bool | None = None,
    ) -> None:
        """No network is touched here: the node joins when the fit's train dataloader is set
        up and leaves in ``teardown``. The module's docstring says more of each parameter.

        Args:
            token: the invitation token ``drift-coord serve`` prints, or a file holding it;
                ``None``: ``token_file``, else ``DRIFT_TOKEN`` (a token or a file), else the
                file ``DRIFT_TOKEN_FILE`` names. A secret: masked in a saved LightningCLI config.
            device: ``"auto"`` (Lightning's accelerator picks) or a torch device (``"cuda:1"``).
            sync_every: a barrier every this many optimizer steps, earlier than the
                coordinator's schedule (unset: barriers spread evenly over the epoch).
            connect_timeout: seconds to wait for the coordinator when joining.
            reconnect_timeout: seconds to keep retrying when the coordinator goes away.
            mode: ``"local"`` (relays off) or ``"internet"``; ``None``: the token's.
            relay_urls: iroh relay URLs for internet mode; by default the token's.
            coordinator_addr: dial the coordinator at this ``host:port`` (its key is checked).
            checkpoint_dir: keep each round's global weights here; ``None`` keeps none.
            name: a label shown in the coordinator's view (the hostname by default).
            progress_every: seconds between progress reports; ``None``: the coordinator's.
            calibration_seconds: how long the start-up calibration benchmark runs.
            token_file: a file holding the token (e.g. a copy of ``STATE_DIR/node.token``).
            peer: the coordinator by id (``"ID"``, ``"ID@HOST:PORT"`` or a ticket); without a
                token the coordinator must list this node's id (``--peers``).
            listen: wait at ``"HOST:PORT"`` for ``peer`` to dial in (no token needed).
            key_file: this node's lasting key (without a token); ``None``: ``node.key`` in
                ``$XDG_STATE_HOME/lightning-drift``.
            overlap: ``False``: every barrier waits for its round; ``None``: the session's.
        """
        found = ways_in(token, token_file, peer, listen, mode)
        root, accelerator = devices.chosen(device)
        super().__init__(device=root, accelerator=accelerator)
        self.device_preference = device
        self.way = Way(  # how the node reaches its coordinator
            found,
            name or socket.gethostname(),
            mode,
            tuple(relay_urls or ()),
            coordinator_addr,
            connect_timeout,
            reconnect_timeout,
            peer,
            listen,
            key_file,
        )
        self._meter = PaceMeter(progress_every=progress_every or 5.0)
        self._joining = Joining(
            self.way,
            self._meter,
            calibration_seconds=calibration_seconds,
            progress_every=progress_every,
            overlap=overlap,
            sync_every=sync_every,
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
            on_delivery=self.on_delivery,
        )
        self._work: EpochWork | None = None  # the node's epochs, once it has joined
        self._stops = StopNegotiation()
        self._parallel: list[torch.device] = []
        self.history: list[BarrierRecord] = []  # one record per barrier, for tests and logs
        self._resumed_from: dict[str, Any] | None = None  # the "drift" entry of a resumed .ckpt
        self._fit_started = False  # False during a Tuner's internal fit: it stays local
        self._stepped_in_batch = False  # manual optimization: the batch took an optimizer step

    @property
    def token(self) -> str | None:
        return self.way.token

    @property
    def runtime(self) -> NodeRuntime | None:
        return self._joining.runtime

    @property
    def config(self) -> p.TrainConfig | None:
        return self._joining.config

    @property
    def node_key(self) -> str:
        return self._joining.node_key

    @property
    def timing(self) -> dict[str, float]:
        """Seconds spent not training, by cause (start-up, waits, hand-offs, applies, re-plans)."""
        return self._meter.timing

    @property
    def busy_s(self) -> float:
        """Seconds the strategy kept training from running since the join (start-up aside)."""
        return self._meter.busy_s

    @property
    def base_round(self) -> int:
        """The round of the verified global weights the parameters are based on (-1: none)."""
        return self._joining.base_round

    @property
    def round_in_flight(self) -> InFlight | None:
        """The barrier whose round has not been applied yet, if any (read only)."""
        return self._joining.round_in_flight

    @property
    def epoch_samples(self) -> int:
        """Samples trained this epoch."""
        return self._meter.epoch_samples

    @property
    def assignment(self) -> p.ShardAssignment | None:
        """The current epoch's work, as last (re-)planned."""
        return self._work.assignment if self._work is not None else None

    @property
    def finished(self) -> bool:
        """The session is over for this node: it holds the final weights, or it left."""
        return self._work is not None and self._work.finished

    @property
    def _pl(self) -> LightningModule:
        module = self.lightning_module
        assert module is not None, "DriftStrategy used before Lightning attached a module"
        return module

    # -- registration and device checks -----------------------------------------------------------
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "drift",
            cls,
            description="Train across machines by averaging weights at barriers "
            f"(token from {TOKEN_ENV})",
            override=True,
        )

    # Lightning's accelerator connector hands every strategy that has these members the devices
    # and node count it resolved from `Trainer(devices=..., num_nodes=...)` (no base class
    # declares them). A drift node owns exactly one device.
    @property
    def parallel_devices(self) -> list[torch.device]:
        return self._parallel

    @parallel_devices.setter
    def parallel_devices(self, resolved: list[torch.device] | None) -> None:
        self._root_device, self._parallel = devices.resolve_devices(
            resolved, self.device_preference, self._root_device
        )

    @property
    def num_nodes(self) -> int:
        return 1

    @num_nodes.setter
    def num_nodes(self, n: int) -> None:
        devices.refuse_num_nodes(n)

    # -- joining and sharding ----------------------------------------------------------------------
    @override
    def setup(self, trainer: Any) -> None:  # Any: the attributes set below are not declared
        super().setup(trainer)
        # Every epoch needs a fresh dataloader over the epoch's shard.
        trainer.reload_dataloaders_every_n_epochs = 1
        self._fit_started = False
        _hook_in(self, trainer.callbacks)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self._pl.trainer
        if trainer.state.stage != RunningStage.TRAINING or not isinstance(dataloader, DataLoader):
            return dataloader
        if not self._fit_started:
            # A Tuner's internal fit (lr_find, scale_batch_size): local, no session.
            log.info("tuner fit: training locally, outside the session")
            return dataloader
        dataset = map_style(dataloader.dataset)
        work = self._work if self.runtime is not None else self._join(len(dataset), dataloader)
        assert work is not None and self.runtime is not None
        try:
            a = self.runtime.shard(trainer.current_epoch)
        except SessionFinished as done:
            work.finished_meanwhile(done)
            return loopstate.with_sampler(dataloader, ShardSampler.empty())
        sampler = work.take(a, len(dataset))
        # A stop asked for at the last epoch's end (EarlyStopping in on_train_epoch_end), or
        # decided meanwhile, is held here, before the epoch trains anything.
        self._hold_due_barriers()
        if work.finished:
            sampler = ShardSampler.empty()
        work.sampler, work.loader = sampler, loopstate.with_sampler(dataloader, sampler)
        loopstate.fit_val_interval(trainer, loopstate.limited(trainer, len(work.loader)))
        return work.loader

    def _join(self, dataset_size: int, loader: DataLoader) -> EpochWork:
        """Join the session (:class:`~lightning_drift.node.joining.Joining`): shards are cut
        in whole optimizer steps of this node (batch size × accumulate_grad_batches)."""
        trainer, module = self._pl.trainer, self._pl
        loopstate.check(trainer)
        batch_size = loader.batch_size or 0
        accumulate = trainer.accumulate_grad_batches if module.automatic_optimization else 1
        shape = Shape(dataset_size, batch_size, batch_size * max(1, accumulate))
        resumed = str((self._resumed_from or {}).get("session") or "")
        loop = loopstate.TrainerLoop(trainer, module)
        asked_epochs = trainer.max_epochs  # the session's replace them when the node joins
        self._work = self._joining.join(
            module, loop, self.root_device, shape, resumed, self.history
        )
        schedules.refuse_short(trainer, len(loader), asked_epochs)
        return self._work

    # -- training hooks ----------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        try:
            n = extract_batch_size(batch)
        except Exception:
            n = 1
        self._meter.batch(n)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        loss = out.get("loss") if isinstance(out, dict) else out
        if isinstance(loss, torch.Tensor):
            self._meter.loss(loss)
        if self.runtime is not None:
            # Lightning's progress bar shows which round this node is training towards.
            self._pl.log("round", float(self.base_round + 1), **_ON_THE_PROGRESS_BAR)
        return out

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if not self._pl.automatic_optimization:  # any number per batch: it counts at its end
            self._stepped_in_batch = True
        elif not self.optimizers or optimizer is self.optimizers[0]:  # once per training step
            self._after_step()
        return out

    def _after_step(self) -> None:
        work = self._work
        if self.runtime is None or work is None or work.barriers is None:
            return
        work.stepped()
        self._hold_due_barriers()
        work.report(self.root_device)

    def finish_epoch(self) -> None:
        """At the training epoch's end: hold the barriers owed (fewer optimizer steps ran than
        the loader promised: manual optimization, skipped steps); end on a round applied."""
        work = self._work
        if self.runtime is None or work is None or work.barriers is None or work.finished:
            return
        work.hold_owed()
        # A stop asked for during the epoch's last validation (EarlyStopping on
        # on_validation_end) is held now, before the epoch's checkpoint is saved.
        self._hold_due_barriers()
        work.settle()

    def _hold_due_barriers(self) -> None:
        """Hold every barrier the plan says is due now, the session's final one included
        (after taking any stop request into the plan: a stop is the session's)."""
        work = self._work
        if self.runtime is None or work is None or work.barriers is None:
            return
        if not work.finished:
            meter = self._meter
            trainer, plan = self._pl.trainer, work.barriers
            self._stops.plan(
                self.runtime, trainer, plan, work.base_round, meter.steps, meter.progress_every
            )
        work.hold_due()

    def batch_ended(self) -> None:
        """After every training batch: under manual optimization a batch that stepped counts
        one step (its barriers are held here, never inside training_step); at ``max_steps``
        this node asks the session to stop, then holds the final barrier or leaves the
        session (:meth:`StopNegotiation.at_max_steps`) before Lightning ends the fit."""
        if self._stepped_in_batch:
            self._stepped_in_batch = False
            self._after_step()
        if self.runtime is None or self.finished:
            return
        if self._stops.at_max_steps(self.runtime, self._pl.trainer, self._work):
            self._hold_due_barriers()

    def hold_barrier(self, *, blocking: bool | None = None) -> None:
        """Hold the epoch's next barrier now (:meth:`EpochWork.hold`; ``blocking=True``: a
        final one, after which the node holds exactly the round's global weights)."""
        assert self._work is not None, "a barrier is held inside an epoch"
        self._work.hold(blocking=blocking)

    def on_delivery(self, delivery: Delivery[Received]) -> None:
        """Called on the training thread for every round applied (a hook for subclasses)."""

    # -- checkpoints and teardown ------------------------------------------------------------------
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        # The canonical checkpoint is the coordinator's: this one says which round's weights
        # the node's are based on (Joining.checkpoint_entry).
        checkpoint["drift"] = self._joining.checkpoint_entry()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        drift = checkpoint.get("drift") if isinstance(checkpoint, dict) else None
        self._resumed_from = drift if isinstance(drift, dict) else None
        return checkpoint

    @override
    def teardown(self) -> None:
        self._close("teardown")
        super().teardown()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._close(f"error: {type(exception).__name__}")

    def _close(self, reason: str) -> None:
        self._joining.close(reason)


class _EpochEndBarriers(Callback):
    """Calls the strategy at each training epoch's end (strategies get no such hook)."""

    def __init__(self, strategy: DriftStrategy) -> None:
        self.strategy = strategy

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.finish_epoch()


_TUNER_CALLBACKS = (BatchSizeFinder, LearningRateFinder)
# How the round the node trains towards is shown: on the progress bar, per step, not logged.
_ON_THE_PROGRESS_BAR: dict[str, Any] = {
    "prog_bar": True,
    "logger": False,
    "on_step": True,
    "on_epoch": False,
    "batch_size": 1,
}


class _FitHooks(Callback):
    """Tells the strategy when the fit itself starts (after any tuner's internal fit, which
    runs in the tuner callbacks' ``on_fit_start``) and when a batch has ended (``max_steps``)."""

    def __init__(self, strategy: DriftStrategy) -> None:
        self.strategy = strategy

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy._fit_started = True
        # A loader loaded before now (by configure_optimizers asking for
        # estimated_stepping_batches, or by a tuner) was not the session's: load it again.
        loopstate.reload_train_data(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.strategy.batch_ended()


def _hook_in(strategy: DriftStrategy, callbacks: list[Callback]) -> None:
    """Put the strategy's callbacks right after the tuner callbacks (Lightning puts them
    first): their on_fit_start, where a Tuner's internal fit runs, comes before ours. Before
    every other callback, so owed barriers are held before ModelCheckpoint saves the epoch's
    end."""
    at = next(
        (i for i, c in enumerate(callbacks) if not isinstance(c, _TUNER_CALLBACKS)),
        len(callbacks),
    )
    for hook in (_EpochEndBarriers, _FitHooks):
        if not any(isinstance(c, hook) for c in callbacks):
            callbacks.insert(at, hook(strategy))
            at += 1


DriftStrategy.register_strategies(StrategyRegistry)
