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
  final one;
- a Tuner's internal fit (``lr_find``, ``scale_batch_size``) stays local: it runs inside a tuner
  callback's ``on_fit_start``, before the fit's own, and nothing joins until that has run.

No network is touched in ``__init__``; the runtime connects in ``process_dataloader`` and
closes in ``teardown``. Every member marked ``@override`` is Lightning's contract; the rest is
the strategy's own, and delegates: the pace meter (:mod:`~lightning_drift.node.pace`), devices
(:mod:`~lightning_drift.node.devices`), the token (:mod:`~lightning_drift.node.token`) and
Lightning's private loop state (:mod:`~lightning_drift.node.loopstate`) each have their part.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jsonargparse.typing import SecretStr
from lightning.pytorch.callbacks import BatchSizeFinder, Callback, LearningRateFinder
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_drift import __version__
from lightning_drift import protocol as p
from lightning_drift.auth import TOKEN_ENV, TOKEN_FILE_ENV, node_identity
from lightning_drift.errors import ConfigError, SessionFinished
from lightning_drift.hardware import describe, memory_now, node_info_fields
from lightning_drift.node import devices, loopstate
from lightning_drift.node.barriers import EpochBarriers, steps_per_epoch, upload_round
from lightning_drift.node.exchange import BarrierRecord, InFlight, RoundExchange
from lightning_drift.node.pace import PaceMeter
from lightning_drift.node.shards import ShardSampler
from lightning_drift.node.stopping import StopNegotiation
from lightning_drift.node.token import find_token, token_given
from lightning_drift.node.weights import GlobalWeights, Received, model_fingerprint
from lightning_drift.peers import parse_peer

if TYPE_CHECKING:
    # A real import of these would run inside Lightning's own package import (see
    # lightning_drift/_lightning_hook.py); the runtime, and with it iroh, loads when a node
    # joins, not whenever Lightning does.
    from lightning.pytorch import LightningModule, Trainer

    from lightning_drift.node.runtime import Delivery, NodeRuntime

log = logging.getLogger(__name__)


class DriftStrategy(SingleDeviceStrategy):
    """Lightning strategy for one node of a drift session (one device per machine).

    Args:
        token: the invitation token printed by ``drift-coord serve`` (or the path of a file
            holding it). ``None``: ``token_file``, else the ``DRIFT_TOKEN`` environment
            variable (a token or a file), else the file ``DRIFT_TOKEN_FILE`` names. A token is
            a password: prefer the environment or a file to writing it into code or a config.
            In a LightningCLI config it is a secret, masked in the saved ``config.yaml``.
        token_file: a file holding the token (e.g. a copy of ``STATE_DIR/node.token``).
        device: ``"auto"`` (let Lightning's accelerator pick: CUDA/ROCm, then MPS, then CPU),
            or an explicit torch device such as ``"cuda:1"``, ``"mps"`` or ``"cpu"``.
        sync_every: leave unset to follow the coordinator's schedule (the epoch's barriers
            spread evenly over its steps). When set, the epoch's barriers come every this many
            optimizer steps instead, earlier than scheduled; the epoch's last barrier always
            stays on its last step. The number of barriers is the coordinator's.
        connect_timeout: seconds to wait for the coordinator when joining.
        reconnect_timeout: seconds to keep retrying when the coordinator goes away.
        mode: ``"local"`` (relays off; loopback and LANs) or ``"internet"`` (relays and hole
            punching); ``None`` uses the mode the token names (``"local"`` for an older token
            that names none).
        relay_urls: custom iroh relay URLs for internet mode; by default the token's (iroh's
            own when it names none).
        coordinator_addr: dial the coordinator at this ``host:port`` instead of the address
            in the token (a forwarded port, a proxy, a new IP); its key is still checked.
        checkpoint_dir: where the node keeps a copy of each global round's weights
            (``round-NNNNNN.safetensors``); ``None`` keeps none.
        name: a label shown in the coordinator's view (the hostname by default).
        progress_every: seconds between progress reports to the coordinator; ``None`` uses
            the interval the coordinator asks for (``TrainConfig.progress_every_s``).
        calibration_seconds: how long the start-up calibration benchmark runs.
        peer: the coordinator by its endpoint id: ``"ID"`` (internet mode: found by
            discovery), ``"ID@HOST:PORT"`` or a ticket. Without a token the node joins
            without one (the coordinator must have this node's id in its ``--peers``); with
            ``listen`` it waits for this coordinator; with a token, the token must name it.
        listen: wait for the coordinator (``peer``) to dial this node, listening on this
            ``"HOST:PORT"`` (``""``: all interfaces, any port). The node logs its id and
            ticket (give either to the coordinator's ``--peers``) and lets in no other key.
            Needs no token.
        key_file: this node's key, for the ways without a token (the coordinator knows a
            node by it); created (0600) on first use. ``None``: ``node.key`` in the user's
            lightning-drift folder (``$XDG_STATE_HOME/lightning-drift``). A node that joins
            with a token uses a fresh key each run.
        overlap: ``True``: overlapped rounds (a barrier hands the upload to the network and
            training goes on; only each epoch's last barrier blocks); ``False``: every barrier
            waits for its round; ``None`` (default): the session's setting
            (``drift-coord serve --overlap/--no-overlap``, on by default).

    After ``fit``, :attr:`history` has one :class:`~lightning_drift.node.exchange.BarrierRecord`
    per barrier and :attr:`timing` the seconds the strategy kept training from running
    (start-up, waiting for rounds, hand-offs, applying weights, following re-plans).
    """

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
        found = _ways_in(token, token_file, peer, listen, mode)
        root, accelerator = devices.chosen(device)
        super().__init__(device=root, accelerator=accelerator)
        self.token, self.token_file, self.key_file = found, token_file, key_file
        self.peer, self.listen, self.mode = peer, listen, mode
        self.relay_urls = list(relay_urls or [])
        self.coordinator_addr = coordinator_addr
        self.connect_timeout, self.reconnect_timeout = connect_timeout, reconnect_timeout
        self.device_preference = device
        self.sync_every, self.overlap = sync_every, overlap
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.node_name = name or socket.gethostname()
        self.progress_every = progress_every
        self.calibration_seconds = calibration_seconds
        # Set when the node joins: the network, the session's settings and the round engine.
        self.runtime: NodeRuntime | None = None
        self.config: p.TrainConfig | None = None
        self.node_key = ""
        self._exchange: RoundExchange | None = None
        self._overlap = False  # resolved when the session's config arrives
        # The current epoch: its work, its barrier points, its sampler and loader.
        self.assignment: p.ShardAssignment | None = None
        self._barriers: EpochBarriers | None = None
        self._sampler: ShardSampler | None = None
        self._loader: DataLoader | None = None
        # The node's own parts, and what it learned.
        self._meter = PaceMeter(progress_every=progress_every or 5.0)
        self._stops = StopNegotiation()
        self._parallel: list[torch.device] = []
        self.history: list[BarrierRecord] = []  # one record per barrier, for tests and logs
        self.finished = False
        self._resumed_from: dict[str, Any] | None = None  # the "drift" entry of a resumed .ckpt
        self._fit_started = False  # False during a Tuner's internal fit: it stays local

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
        return self._exchange.base_round if self._exchange is not None else -1

    @property
    def round_in_flight(self) -> InFlight | None:
        """The barrier whose round has not been applied yet, if any (read only)."""
        return self._exchange.in_flight if self._exchange is not None else None

    @property
    def epoch_samples(self) -> int:
        """Samples trained this epoch."""
        return self._meter.epoch_samples

    @property
    def _pl(self) -> LightningModule:
        module = self.lightning_module
        assert module is not None, "DriftStrategy used before Lightning attached a module"
        return module

    @property
    def _runtime(self) -> NodeRuntime:
        assert self.runtime is not None, "DriftStrategy used before it joined the session"
        return self.runtime

    @property
    def _rounds(self) -> RoundExchange:
        assert self._exchange is not None, "DriftStrategy used before it joined the session"
        return self._exchange

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
        callbacks = trainer.callbacks
        # Right after the tuner callbacks (Lightning puts them first): their on_fit_start,
        # where a Tuner's internal fit runs, comes before ours. Before every other callback,
        # so owed barriers are held before ModelCheckpoint saves the epoch's end.
        at = next(
            (i for i, c in enumerate(callbacks) if not isinstance(c, _TUNER_CALLBACKS)),
            len(callbacks),
        )
        for hook in (_EpochEndBarriers, _FitHooks):
            if not any(isinstance(c, hook) for c in callbacks):
                callbacks.insert(at, hook(self))
                at += 1

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self._pl.trainer
        if trainer.state.stage != RunningStage.TRAINING or not isinstance(dataloader, DataLoader):
            return dataloader
        if not self._fit_started:
            # A Tuner's internal fit (lr_find, scale_batch_size): local, no session.
            log.info("tuner fit: training locally, outside the session")
            return dataloader
        dataset = dataloader.dataset
        if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
            raise ConfigError(
                "DriftStrategy shards a map-style dataset (one with __len__ and __getitem__); the "
                f"train dataset is a {type(dataset).__name__}. Wrap your data in a map-style "
                "Dataset so the coordinator can give each node its own indices."
            )
        if self.runtime is None:
            loopstate.check(trainer)
            batch_size = dataloader.batch_size or 0
            accumulate = trainer.accumulate_grad_batches if self._pl.automatic_optimization else 1
            self._join(len(dataset), batch_size, batch_size * max(1, accumulate))
        try:
            a = self._runtime.shard(trainer.current_epoch)
        except SessionFinished as done:
            self._finished_meanwhile(done)
            return loopstate.with_sampler(dataloader, ShardSampler.empty())
        sampler = self._take_shard(a, len(dataset))
        # A stop asked for at the last epoch's end (EarlyStopping in on_train_epoch_end), or
        # decided meanwhile, is held here, before the epoch trains anything.
        self._hold_due_barriers()
        if self.finished:
            sampler = ShardSampler.empty()
        loader = loopstate.with_sampler(dataloader, sampler)
        self._sampler, self._loader = sampler, loader
        return loader

    def _finished_meanwhile(self, done: SessionFinished) -> None:
        """The session finished while this node was away, or between two of its epochs (a
        stop): make sure it holds the final weights, train nothing more, end the fit."""
        if self.base_round < done.final_round:
            self._sync(p.BarrierSync(round=0, epoch=self._pl.trainer.current_epoch))
        log.warning(
            "the session finished at round %d; this node holds its final weights",
            done.final_round,
        )
        self.finished = True
        loopstate.end_fit(self._pl.trainer)

    def _take_shard(self, a: p.ShardAssignment, dataset_size: int) -> ShardSampler:
        """The epoch's work: its barrier points and the sampler over it."""
        trainer = self._pl.trainer
        if a.epoch != trainer.current_epoch:
            was = loopstate.jump_to_epoch(trainer, a.epoch)
            log.info("rejoin: jumping from epoch %d to the session's epoch %d", was, a.epoch)
        self.assignment = a
        self._barriers = EpochBarriers(
            rounds=a.rounds, first_round=a.first_round, sync_every=self.sync_every
        )
        self._meter.new_epoch()
        log.info(
            "shard epoch=%d ranges=%s size=%d rounds=%d first_round=%d",
            a.epoch,
            a.ranges,
            a.size,
            a.rounds,
            a.first_round,
        )
        self._log_metrics({"drift/shard_size": float(a.size), "drift/epoch": a.epoch})
        return ShardSampler.for_assignment(a, dataset_size)

    def _join(self, dataset_size: int, batch_size: int = 0, samples_per_step: int = 0) -> None:
        """Join the session, take its settings, and hold the start-up sync (round 0).

        ``batch_size`` and ``samples_per_step`` (batch size × accumulate_grad_batches) let
        the coordinator cut shards in whole optimizer steps of this node."""
        with self._meter.start_up():
            hw = node_info_fields(self.root_device, seconds=self.calibration_seconds)
            config = self._connect(dataset_size, batch_size, samples_per_step, hw)
            self._take_config(config, hw)
            self._meter.restart()  # whatever a Tuner's local fit counted is not this session's
            # Start-up sync: offer our weights as round 0; everyone starts from the same ones.
            self._sync(p.BarrierSync(round=0, epoch=self._pl.trainer.current_epoch))
        # Progress reports measure training from here on.
        self._meter.restart()

    def _connect(
        self, dataset_size: int, batch_size: int, samples_per_step: int, hw: dict[str, Any]
    ) -> p.TrainConfig:
        """Start the runtime: join the session; its ``TrainConfig``."""
        fingerprint = model_fingerprint(self._pl)

        def info() -> p.NodeInfo:
            return p.NodeInfo(
                nonce="",
                dataset_size=dataset_size,
                model_fingerprint=fingerprint,
                batch_size=batch_size,
                samples_per_step=samples_per_step,
                **hw,
            )

        from lightning_drift.node.runtime import NodeRuntime

        self.runtime = NodeRuntime(
            self.token,
            info,
            name=self.node_name,
            mode=self.mode,
            relay_urls=tuple(self.relay_urls),
            via=(self.coordinator_addr,) if self.coordinator_addr else (),
            connect_timeout=self.connect_timeout,
            reconnect_timeout=self.reconnect_timeout,
            peer=self.peer,
            listen=self.listen,
            # Without a token the coordinator knows this node by its lasting key.
            secret=None if self.token else node_identity(self.key_file).seed,
        )
        self.node_key = self.runtime.node_key
        return self.runtime.start()

    def _take_config(self, config: p.TrainConfig, hw: dict[str, Any]) -> None:
        """The session's settings: how weights travel, overlap, reports, the epochs."""
        self.config = config
        self._exchange = RoundExchange(
            self._runtime,
            GlobalWeights(config.transfer_dtype),
            self._pl,
            self._meter,
            has_weights=config.has_weights,
            checkpoint_dir=self.checkpoint_dir,
            on_delivery=self.on_delivery,
        )
        self._overlap = config.overlap if self.overlap is None else self.overlap
        resumed = self._resumed_from
        if resumed and resumed.get("session") and resumed["session"] != config.session_id:
            log.warning(
                "the checkpoint resumed from belongs to session %s, not to this session (%s): "
                "its weights are replaced at the start-up sync; its optimizer state is kept",
                resumed["session"],
                config.session_id,
            )
        if self.progress_every is None and config.progress_every_s > 0:
            self._meter.progress_every = config.progress_every_s
        if any(not d.usable for d in hw["devices"]):
            # Say plainly which devices cannot train (e.g. Vulkan-only GPUs) and what does.
            log.warning(
                "devices found but not used for training:\n%s",
                describe(hw["devices"], str(self.root_device)),
            )
        trainer = self._pl.trainer
        overridden = loopstate.keep_fitting(trainer, config.epochs)
        if overridden is not None:
            log.warning(
                "epochs: the session trains %d epochs; Trainer(max_epochs=%s) is overridden",
                config.epochs,
                overridden,
            )

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
            self._pl.log(
                "round",
                float(self.base_round + 1),
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )
        return out

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        # With several optimizers, one training step is counted once: at the first one's step.
        if not self.optimizers or optimizer is self.optimizers[0]:
            self._after_step()
        return out

    def _after_step(self) -> None:
        plan = self._barriers
        if self.runtime is None or plan is None:
            return
        self._meter.step()
        if plan.total_steps is None:  # the loader's length is known from the first step on
            plan.total_steps = self._steps_per_epoch()
        plan.step()
        self._poll()
        self._hold_due_barriers()
        if self._meter.report_due():
            used, peak = memory_now(self.root_device)
            self.runtime.report(
                self._meter.report(
                    self.base_round + 1,  # the round this node is training towards
                    self._pl.trainer.current_epoch,
                    used,
                    peak,
                )
            )

    def finish_epoch(self) -> None:
        """At the training epoch's end: hold the epoch's remaining barriers now if fewer
        optimizer steps ran than the loader promised (manual optimization, skipped steps): the
        coordinator's rounds must not wait for a barrier this node would never reach. The
        epoch ends on a round applied."""
        plan = self._barriers
        if self.runtime is None or plan is None or self.finished:
            return
        while plan.owed() and not self.finished:
            log.info("epoch ended before barrier %d; holding it now", plan.done + 1)
            self.hold_barrier()
        # A stop asked for during the epoch's last validation (EarlyStopping on
        # on_validation_end) is held now, before the epoch's checkpoint is saved.
        self._hold_due_barriers()
        self._settle()

    # -- stopping: a session decision ----------------------------------------------------------

    def _hold_due_barriers(self) -> None:
        """Hold every barrier the plan says is due now, the session's final one included
        (after taking any stop request into the plan)."""
        plan = self._barriers
        if self.runtime is None or plan is None:
            return
        if not self.finished:
            self._stops.plan(
                self.runtime,
                self._pl.trainer,
                plan,
                self.base_round,
                self._meter.steps,
                self._meter.progress_every,
            )
        while plan.due() and not self.finished:
            self.hold_barrier()

    def batch_ended(self) -> None:
        """After every training batch: at ``Trainer(max_steps)`` Lightning ends the fit, so
        this node asks the session to stop (a request it always honours) and holds the final
        barrier before Lightning does."""
        trainer = self._pl.trainer
        if self.runtime is None or self.finished or trainer.max_steps in (-1, None):
            return
        if trainer.global_step < trainer.max_steps:
            return
        if self.runtime.stop is None:
            reason = f"reached Trainer(max_steps={trainer.max_steps})"
            every = self._meter.progress_every
            self._stops.ask(self.runtime, trainer, "max_steps", reason, self._meter.steps, every)
        self._hold_due_barriers()

    def _steps_per_epoch(self) -> int:
        trainer = self._pl.trainer
        assert self.assignment is not None
        return steps_per_epoch(
            trainer.num_training_batches,
            shard_size=self.assignment.size,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            automatic=self._pl.automatic_optimization,
        )

    # -- barriers ----------------------------------------------------------------------------------

    def hold_barrier(self, *, blocking: bool | None = None) -> None:
        """Hold the epoch's next barrier now: the one place a barrier is executed.

        The barrier planning (:class:`EpochBarriers`, the epoch's end) calls it when a barrier
        is due. First the round still in flight, if any, is waited for and applied (at most one
        round in flight). Then the weights are handed to the network thread for the next round.
        ``blocking=None`` blocks at the epoch's last barrier (or always, without overlap) and
        overlaps the others; ``blocking=True`` holds a final, blocking barrier: when it returns,
        the node holds exactly the round's global weights.
        """
        plan = self._barriers
        assert plan is not None, "a barrier is held inside an epoch"
        if blocking is None:
            blocking = not self._overlap or plan.last
        self._settle()
        if self.finished:
            return
        meter = self._meter
        sync = p.BarrierSync(
            round=upload_round(self.base_round, plan.scheduled_round),
            epoch=self._pl.trainer.current_epoch,
            samples=meter.samples,
            steps=plan.steps,
            loss=meter.last_loss,
            # Training time since the previous upload: the coordinator measures pace from it.
            train_seconds=meter.train_seconds(),
            epoch_samples=meter.epoch_samples,
        )
        self._rounds.hand_off(sync, overlap=not blocking)
        plan.held()
        if blocking:
            self._settle()

    def _sync(self, sync: p.BarrierSync) -> None:
        """A blocking barrier outside the epoch's plan (the start-up sync, fetching the final
        weights): upload, wait for the round's global weights and load them exactly."""
        self._rounds.hand_off(sync, overlap=False)
        self._settle()

    def _poll(self) -> None:
        """Between optimizer steps: apply the round in flight if its weights have come, and
        follow a re-plan of the epoch if one has."""
        if self._rounds.arrived:
            self._settle()
        replan = self._runtime.replan()
        if replan is not None:
            self._follow(replan)

    def _settle(self) -> None:
        """Wait for the round in flight, if any, apply its global weights, record it."""
        record = self._exchange.settle() if self._exchange is not None else None
        if record is not None:
            self._applied(record)

    def _applied(self, record: BarrierRecord) -> None:
        """A round was applied: record it, log it, and end the fit if the session is over."""
        self.finished = record.finished
        self.history.append(record)
        log.info(
            "barrier round=%d contributed=%s payload=%s wait_s=%.3f overlapped=%s samples=%d",
            record.round,
            record.contributed,
            record.payload,
            record.wait_s,
            record.overlapped,
            record.samples,
        )
        runtime = self._runtime
        self._log_metrics(
            {
                "drift/round": float(record.round),
                "drift/barrier_wait_s": record.wait_s,
                "drift/bytes_sent": float(runtime.bytes_sent),
                "drift/bytes_received": float(runtime.bytes_received),
                "drift/samples_per_round": float(record.samples),
            }
        )
        plan = self._barriers
        trainer = self._pl.trainer
        more = plan is not None and (
            plan.stopped or plan.owed() > 0 or trainer.current_epoch + 1 < (trainer.max_epochs or 0)
        )
        if self.finished and more:
            # The session stopped early, or a straggler was answered with the session's final
            # weights: nothing left to train.
            log.warning("the session finished at round %d; stopping", record.round)
            loopstate.end_fit(trainer)

    def on_delivery(self, delivery: Delivery[Received]) -> None:
        """Called on the training thread for every round applied (a hook for subclasses)."""

    def _follow(self, a: p.ShardAssignment) -> None:
        """Take the coordinator's re-plan of the current epoch: the sampler's rest, Lightning's
        epoch length and the barriers not yet held follow it."""
        current, plan, sampler, loader = (
            self.assignment,
            self._barriers,
            self._sampler,
            self._loader,
        )
        if current is None or plan is None or sampler is None or loader is None:
            return
        if a.epoch != current.epoch or a.revision <= current.revision or not plan.owed():
            return
        with self._meter.busy("replan_s"):
            overrun = sampler.update(a.ranges)
            self.assignment = a
            loopstate.follow_epoch_length(self._pl.trainer, len(loader))
            plan.retarget(self._steps_per_epoch())
        if overrun:
            log.warning(
                "re-plan revision=%d: %d sample(s) already loaded here moved to another node; "
                "they are trained twice this epoch",
                a.revision,
                overrun,
            )
        log.info(
            "replan epoch=%d revision=%d size=%d steps=%s",
            a.epoch,
            a.revision,
            a.size,
            plan.total_steps,
        )
        self._log_metrics({"drift/shard_size": float(a.size)})

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        try:
            trainer = self._pl.trainer
        except Exception:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # -- checkpoints and teardown ------------------------------------------------------------------

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        # The canonical checkpoint is the coordinator's; this file records which round's global
        # weights the node's are based on ("round"). ``samples_since_round`` is 0 when the
        # weights are exactly that round's (saved at a barrier or an epoch's end); otherwise
        # they are local, mid-round weights.
        inflight = self.round_in_flight
        checkpoint["drift"] = {
            "round": self.base_round,
            "session": self.config.session_id if self.config else "",
            "samples_since_round": self._meter.samples + (inflight.sync.samples if inflight else 0),
            "version": __version__,
        }
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
        if self._exchange is not None:
            self._exchange.drop()
        if self.runtime is not None:
            self.runtime.close(reason)
            self.runtime = None


class _EpochEndBarriers(Callback):
    """Calls the strategy at each training epoch's end (strategies get no such hook)."""

    def __init__(self, strategy: DriftStrategy) -> None:
        self.strategy = strategy

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.finish_epoch()


_TUNER_CALLBACKS = (BatchSizeFinder, LearningRateFinder)


class _FitHooks(Callback):
    """Tells the strategy when the fit itself starts (after any tuner's internal fit, which
    runs in the tuner callbacks' ``on_fit_start``) and when a batch has ended (``max_steps``)."""

    def __init__(self, strategy: DriftStrategy) -> None:
        self.strategy = strategy

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy._fit_started = True

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.strategy.batch_ended()


def _ways_in(
    token: SecretStr | str | None,
    token_file: str | None,
    peer: str | None,
    listen: str | None,
    mode: str | None,
) -> str | None:
    """Check how the node is to reach its coordinator; the token it joins with, if any."""
    if listen is not None:
        if not peer or token_given(token, token_file):
            raise ConfigError(
                "DriftStrategy(listen=...) waits for the coordinator named by peer=... "
                "(its id) to dial in: give peer, and no token"
            )
        found = None  # a token in the environment is not this node's business
    else:
        # With peer=..., a node may join without a token (the coordinator lists its id).
        found = find_token(token, token_file=token_file)
        if not found and not peer:
            raise ConfigError(
                "DriftStrategy needs an invitation token: set "
                f"{TOKEN_ENV} (the token or a file holding it) or {TOKEN_FILE_ENV}, or pass "
                "DriftStrategy(token_file=...) or token=...; `drift-coord serve` prints one and "
                "writes it to STATE_DIR/node.token (or name the coordinator by id with "
                "peer=..., if it lists this node's id)"
            )
    if peer:
        parse_peer(peer)  # a malformed id fails here, not when the node joins
    if mode not in (None, "local", "internet"):
        raise ConfigError(
            f"mode must be 'local' or 'internet' (or None: the token's), not {mode!r}"
        )
    return found


DriftStrategy.register_strategies(StrategyRegistry)
