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
  (:meth:`DriftStrategy.hold_barrier`). An **overlapped** barrier copies the weights, hands the
  upload to the network thread (:mod:`lightning_drift.node.weights` builds it there) and
  trains on; when the round's global weights arrive they are folded in between two optimizer
  steps as ``global + (weights now - copy)``, in place (parameter identity and optimizer state
  kept). At most one round is in flight: the next barrier first waits for the previous
  round. A **blocking** barrier (each epoch's last, and every one with ``overlap=False``) waits
  for the round and loads its weights exactly;
- the last barrier of the last epoch is the final one: every node ends holding the
  coordinator's final checkpoint.

Planning, apart from holding barriers:

- the node reports its batch size and samples per optimizer step when it joins, so its shards
  are whole optimizer steps and rounds are planned in optimizer steps;
- a stop is the session's: when a callback sets ``trainer.should_stop`` (EarlyStopping) or the
  node reaches ``max_steps``, the node asks the coordinator; until the session decides,
  Lightning is kept from ending the fit on its own (``min_epochs``); a stop the session
  overrules is logged and training goes on; once the session stops, the next barrier is the
  final one (:meth:`~lightning_drift.node.barriers.EpochBarriers.finish_at`);
- a Tuner's internal fit (``lr_find``, ``scale_batch_size``) stays local: it runs inside a tuner
  callback's ``on_fit_start``, before the fit's own, and nothing joins until that has run.

No network is touched in ``__init__``; the runtime connects in ``process_dataloader`` and
closes in ``teardown``. Every member marked ``@override`` is Lightning's contract; the rest is
the strategy's own.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator, Sized
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import torch
from jsonargparse.typing import SecretStr
from lightning.pytorch.accelerators import (
    Accelerator,
    CPUAccelerator,
    CUDAAccelerator,
    MPSAccelerator,
)
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    Callback,
    EarlyStopping,
    LearningRateFinder,
)
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader, extract_batch_size
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_drift import __version__
from lightning_drift import protocol as p
from lightning_drift.auth import TOKEN_ENV, TOKEN_FILE_ENV, node_identity
from lightning_drift.errors import ConfigError, SessionError, SessionFinished
from lightning_drift.hardware import choose_device, describe, memory_now, node_info_fields
from lightning_drift.node.barriers import EpochBarriers, contributing_round, steps_per_epoch
from lightning_drift.node.shards import ShardSampler
from lightning_drift.node.token import find_token, token_given
from lightning_drift.node.weights import (
    GlobalWeights,
    Received,
    StateDict,
    WeightsMismatch,
    apply_in_place,
    keep_round_copy,
    load_in_place,
    local_state,
    model_fingerprint,
    snapshot,
)
from lightning_drift.peers import parse_peer

if TYPE_CHECKING:
    # A real import of these would run inside Lightning's own package import (see
    # lightning_drift/_lightning_hook.py); the runtime, and with it iroh, loads when a node
    # joins, not whenever Lightning does.
    from lightning.pytorch import LightningModule, Trainer

    from lightning_drift.node.runtime import Delivery, NodeRuntime

log = logging.getLogger(__name__)

# The first progress report (the coordinator's first measured rate for this node) comes after
# this many optimizer steps, or after this many seconds of training once a step is measured,
# not counting the fit's first (warm-up) step: a re-plan of the first epoch can then follow
# real step times instead of the start-up calibration.
EARLY_REPORT_STEPS = 8
EARLY_REPORT_S = 2.0


@dataclass
class _InFlight:
    """A barrier whose round has not been applied yet."""

    future: Future[Delivery[Received]]
    taken: StateDict | None  # the weights at the barrier (overlapped); None when blocking
    sync: p.BarrierSync  # as the barrier made it (the network thread names the base)
    handed_at: float  # monotonic time of the hand-off
    step: int  # optimizer steps of this fit when the barrier was held


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

    After ``fit``, :attr:`history` has one entry per barrier and :attr:`timing` the seconds the
    strategy kept training from running (start-up, waiting for rounds, hand-offs, applying
    weights, following re-plans).
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
        if listen is not None:
            if not peer or token_given(token, token_file):
                raise ConfigError(
                    "DriftStrategy(listen=...) waits for the coordinator named by peer=... "
                    "(its id) to dial in: give peer, and no token"
                )
            found = None  # a token in the environment is not this node's business
        else:
            # With peer=..., a node may join without a token (the coordinator lists its id).
            found = _find_token(token, token_file, required=not peer)
        if peer:
            parse_peer(peer)  # a malformed id fails here, not when the node joins
        if mode not in (None, "local", "internet"):
            raise ConfigError(
                f"mode must be 'local' or 'internet' (or None: the token's), not {mode!r}"
            )
        accelerator: Accelerator | None = None
        root = torch.device("cpu")
        if device != "auto":
            root = choose_device(device)
            accelerator = _accelerator_for(root)
        super().__init__(device=root, accelerator=accelerator)
        self.token = found
        self.token_file = token_file
        self.peer = peer
        self.listen = listen
        self.key_file = key_file
        self.device_preference = device
        self.sync_every = sync_every
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.mode = mode
        self.relay_urls = list(relay_urls or [])
        self.coordinator_addr = coordinator_addr
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.node_name = name or socket.gethostname()
        self.progress_every = progress_every
        self._progress_every = progress_every or 5.0  # until the session's config arrives
        self.calibration_seconds = calibration_seconds

        self.overlap = overlap
        self.runtime: NodeRuntime | None = None
        self.config: p.TrainConfig | None = None
        self.assignment: p.ShardAssignment | None = None
        self.history: list[dict[str, Any]] = []  # one entry per barrier, for tests and logs
        # Seconds spent not training, by cause; busy_s is their running sum (start-up aside).
        self.timing: dict[str, float] = dict.fromkeys(
            ("startup_s", "wait_s", "handoff_s", "apply_s", "replan_s"), 0.0
        )
        self.busy_s = 0.0
        self._starting = False  # inside the join: its time is start-up, whatever it waits for
        self._overlap = False  # resolved when the session's config arrives
        self._parallel: list[torch.device] = []
        self._weights: GlobalWeights | None = None  # set when the session's config arrives
        self._barriers: EpochBarriers | None = None  # the current epoch's barrier points
        self._sampler: ShardSampler | None = None  # the current epoch's, and its loader
        self._loader: DataLoader | None = None
        self._inflight: _InFlight | None = None
        self._held_round = -1  # the round whose global weights the parameters are based on
        self._samples = 0  # samples trained since the last barrier's upload
        self._epoch_samples = 0  # samples trained this epoch
        self._steps = 0  # optimizer steps in this fit
        self._train_t0 = time.monotonic()  # when the last upload was taken, and busy_s then
        self._train_busy0 = 0.0
        self._last_loss: torch.Tensor | float | None = None
        self._last_report = time.monotonic()
        self._rate_t0 = time.monotonic()  # the progress report's measuring window
        self._rate_busy0 = 0.0
        self._rate_samples = 0
        self._rate_steps = 0
        self._reported = False  # the first (early) progress report has gone out
        self.finished = False
        self.node_key = ""
        self._resumed_from: dict[str, Any] | None = None  # the "drift" entry of a resumed .ckpt
        self._fit_started = False  # False during a Tuner's internal fit: it stays local
        self._ask_again_at = 0.0  # after an overruled stop request, when to ask again
        self._overruled = ""  # the last overruling, logged once

    @property
    def _pl(self) -> LightningModule:
        module = self.lightning_module
        assert module is not None, "DriftStrategy used before Lightning attached a module"
        return module

    @property
    def _runtime(self) -> NodeRuntime:
        assert self.runtime is not None, "DriftStrategy used before it joined the session"
        return self.runtime

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
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        devices = [torch.device(d) for d in (devices or [])]
        if len(devices) > 1:
            if _explicitly_several(devices):
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
                self._root_device if self.device_preference != "auto" else devices[0],
            )
        if self.device_preference != "auto":
            # An explicit DriftStrategy(device=...) wins over what the Trainer resolved.
            self._parallel = [self._root_device]
            return
        if devices:
            self._root_device = devices[0]
        self._parallel = devices[:1]

    @property
    def num_nodes(self) -> int:
        return 1

    @num_nodes.setter
    def num_nodes(self, n: int) -> None:
        if n != 1:
            raise ConfigError(
                f"Trainer(num_nodes={n}) does not apply to DriftStrategy: each machine runs its own "
                "node and joins the session with its token; leave num_nodes=1."
            )

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
            batch_size = dataloader.batch_size or 0
            accumulate = trainer.accumulate_grad_batches if self._pl.automatic_optimization else 1
            self._join(len(dataset), batch_size, batch_size * max(1, accumulate))
        try:
            a = self._runtime.shard(trainer.current_epoch)
        except SessionFinished as done:
            # The session finished while this node was away, or between two of its epochs (a
            # stop): make sure it holds the final weights, train nothing more, end the fit.
            if self._held_round < done.final_round:
                self._sync(p.BarrierSync(round=0, epoch=trainer.current_epoch))
            log.warning(
                "the session finished at round %d; this node holds its final weights",
                done.final_round,
            )
            self.finished = True
            self._end_training()
            return _update_dataloader(dataloader, ShardSampler.empty(), mode=RunningStage.TRAINING)
        if a.epoch != trainer.current_epoch:
            self._jump_to_epoch(a.epoch)
        self.assignment = a
        sampler = ShardSampler.for_assignment(a, len(dataset))
        self._barriers = EpochBarriers(
            rounds=a.rounds, first_round=a.first_round, sync_every=self.sync_every
        )
        self._epoch_samples = 0
        log.info(
            "shard epoch=%d ranges=%s size=%d rounds=%d first_round=%d",
            a.epoch,
            a.ranges,
            a.size,
            a.rounds,
            a.first_round,
        )
        self._log_metrics({"drift/shard_size": float(a.size), "drift/epoch": a.epoch})
        # A stop asked for at the last epoch's end (EarlyStopping in on_train_epoch_end), or
        # decided meanwhile, is held here, before the epoch trains anything.
        self._hold_due_barriers()
        if self.finished:
            sampler = ShardSampler.empty()
        loader = _update_dataloader(dataloader, sampler, mode=RunningStage.TRAINING)
        self._sampler, self._loader = sampler, loader
        return loader

    def _join(self, dataset_size: int, batch_size: int = 0, samples_per_step: int = 0) -> None:
        """Join the session, take its settings, and hold the start-up sync (round 0).

        ``batch_size`` and ``samples_per_step`` (batch size × accumulate_grad_batches) let
        the coordinator cut shards in whole optimizer steps of this node."""
        t0 = time.monotonic()
        self._starting = True
        try:
            self._join_session(dataset_size, batch_size, samples_per_step)
        finally:
            self._starting = False
            self.timing["startup_s"] += time.monotonic() - t0
        # Progress reports measure training from here on.
        self._last_report = self._rate_t0 = time.monotonic()
        self._rate_busy0 = self.busy_s

    def _join_session(self, dataset_size: int, batch_size: int, samples_per_step: int) -> None:
        module = self._pl
        fingerprint = model_fingerprint(module)
        hw = node_info_fields(self.root_device, seconds=self.calibration_seconds)

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
        config = self.runtime.start()
        self.config = config
        self._weights = GlobalWeights(config.transfer_dtype)
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
            self._progress_every = config.progress_every_s
        unusable = [d for d in hw["devices"] if not d.usable]
        if unusable:
            # Say plainly which devices cannot train (e.g. Vulkan-only GPUs) and what does.
            log.warning(
                "devices found but not used for training:\n%s",
                describe(hw["devices"], str(self.root_device)),
            )
        trainer = module.trainer
        if trainer.fit_loop.max_epochs != config.epochs:
            log.warning(
                "epochs: the session trains %d epochs; Trainer(max_epochs=%s) is overridden",
                config.epochs,
                trainer.fit_loop.max_epochs,
            )
            trainer.fit_loop.max_epochs = config.epochs
        # Lightning must not end the fit on a callback's trainer.should_stop by itself: the
        # session decides (see _plan_stop), and _end_training lets Lightning stop.
        trainer.fit_loop.min_epochs = max(trainer.fit_loop.min_epochs or 0, config.epochs)
        # Whatever a Tuner's local fit counted is not this session's.
        self._samples = self._rate_samples = self._steps = 0
        # Start-up sync: offer our weights as round 0; everyone starts from the same ones.
        self._sync(p.BarrierSync(round=0, epoch=trainer.current_epoch))

    def _jump_to_epoch(self, epoch: int) -> None:
        """A node rejoining a session that moved on continues at the coordinator's epoch."""
        progress: Any = self._pl.trainer.fit_loop.epoch_progress.current
        log.info(
            "rejoin: jumping from epoch %d to the session's epoch %d", progress.completed, epoch
        )
        progress.ready = progress.started = progress.processed = progress.completed = epoch

    # -- training hooks ----------------------------------------------------------------------------

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        try:
            n = extract_batch_size(batch)
        except Exception:
            n = 1
        self._samples += n
        self._epoch_samples += n
        self._rate_samples += n

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        loss = out.get("loss") if isinstance(out, dict) else out
        if isinstance(loss, torch.Tensor):
            self._last_loss = loss.detach()
        if self.runtime is not None:
            # Lightning's progress bar shows which round this node is training towards.
            self._pl.log(
                "round",
                float(self._held_round + 1),
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
        self._steps += 1
        self._rate_steps += 1
        if self._steps == 1:
            # The fit's first step carries one-time costs (allocation, lazy init, the first
            # batch): the coordinator's first rate must not include it.
            self._rate_t0, self._rate_busy0 = time.monotonic(), self.busy_s
            self._rate_samples = self._rate_steps = 0
        if plan.total_steps is None:  # the loader's length is known from the first step on
            plan.total_steps = self._steps_per_epoch()
        plan.step()
        self._poll()
        self._hold_due_barriers()
        now = time.monotonic()
        if self._rate_steps and (
            now - self._last_report >= self._progress_every
            or (not self._reported and self._rate_steps >= EARLY_REPORT_STEPS)
            or (not self._reported and self._trained_s(now) >= EARLY_REPORT_S)
        ):
            self._report(now)

    def _trained_s(self, now: float) -> float:
        """Training time in the progress report's window (waits, hand-offs, applies left out)."""
        return now - self._rate_t0 - (self.busy_s - self._rate_busy0)

    def _finish_epoch(self) -> None:
        """Hold the epoch's remaining barriers now if fewer optimizer steps ran than the
        loader promised (manual optimization, skipped steps): the coordinator's rounds must
        not wait for a barrier this node would never reach. The epoch ends on a round applied."""
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
        (after taking any stop request into the plan: :meth:`_plan_stop`)."""
        plan = self._barriers
        if self.runtime is None or plan is None:
            return
        self._plan_stop()
        while plan.due() and not self.finished:
            self.hold_barrier()

    def _plan_stop(self) -> None:
        """Ask the session to stop when Lightning was asked to (something set
        ``trainer.should_stop``); once the session has decided, the epoch's next barrier is
        the final one, due now. An overruled request is logged and training goes on."""
        runtime, plan = self.runtime, self._barriers
        if runtime is None or plan is None or self.finished:
            return
        trainer = self._pl.trainer
        if trainer.should_stop and runtime.stop is None:
            self._ask_to_stop("callback", _why_stopping(trainer))
        decision = runtime.stop
        if decision is not None and not plan.stopped and self._held_round < decision.round:
            log.warning(
                "the session stops early: %s; holding the final barrier (round %d)",
                decision.reason,
                decision.round,
            )
            plan.finish_at(decision.round)

    def _ask_to_stop(self, kind: p.StopKind, reason: str) -> None:
        """Send a stop request and act on the answer: an overruled ``should_stop`` is undone,
        and asked again at most every few seconds."""
        runtime = self._runtime
        trainer = self._pl.trainer
        now = time.monotonic()
        if kind == "callback" and now < self._ask_again_at:
            trainer.should_stop = False  # overruled a moment ago; the session's answer stands
            return
        answer = runtime.request_stop(
            p.StopRequest(kind=kind, reason=reason, epoch=trainer.current_epoch, step=self._steps)
        )
        if answer.stop:
            return
        trainer.should_stop = False
        self._ask_again_at = now + max(1.0, self._progress_every)
        if answer.reason != self._overruled:
            self._overruled = answer.reason
            log.warning("%s; this node trains on with the session", answer.reason)

    def _reached_max_steps(self) -> None:
        """Called after every training batch: at ``Trainer(max_steps)`` Lightning ends the fit,
        so this node asks the session to stop (a request it always honours) and holds the
        final barrier before Lightning does."""
        trainer = self._pl.trainer
        if self.runtime is None or self.finished or trainer.max_steps in (-1, None):
            return
        if trainer.global_step < trainer.max_steps:
            return
        if self.runtime.stop is None:
            self._ask_to_stop("max_steps", f"reached Trainer(max_steps={trainer.max_steps})")
        self._hold_due_barriers()

    def _end_training(self) -> None:
        """The session is over for this node: let Lightning end the fit after this batch."""
        trainer = self._pl.trainer
        trainer.should_stop = True
        trainer.fit_loop.min_epochs = 0
        trainer.fit_loop.epoch_loop.min_steps = None

    def _steps_per_epoch(self) -> int:
        trainer = self._pl.trainer
        assert self.assignment is not None
        return steps_per_epoch(
            trainer.num_training_batches,
            shard_size=self.assignment.size,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            automatic=self._pl.automatic_optimization,
        )

    def _loss(self) -> float | None:
        if self._last_loss is None:
            return None
        return float(self._last_loss)

    def _report(self, now: float) -> None:
        runtime = self._runtime
        # Training time only: waiting for rounds, hand-offs and applies are not the node's pace.
        elapsed = max(1e-6, self._trained_s(now))
        used, peak = memory_now(self.root_device)
        runtime.report(
            p.TrainProgress(
                round=self._held_round + 1,  # the round this node is training towards
                epoch=self._pl.trainer.current_epoch,
                step=self._steps,
                samples=self._samples,
                loss=self._loss(),
                samples_per_s=self._rate_samples / elapsed,
                vram_used=used,
                vram_peak=peak,
                epoch_samples=self._epoch_samples,
            )
        )
        self._reported = True
        self._last_report = self._rate_t0 = now
        self._rate_busy0 = self.busy_s
        self._rate_samples = self._rate_steps = 0

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
        sync = p.BarrierSync(
            round=contributing_round(self._held_round, plan.scheduled_round),
            epoch=self._pl.trainer.current_epoch,
            samples=self._samples,
            steps=plan.steps,
            loss=self._loss(),
            # Training time since the previous upload: the coordinator measures pace from it.
            train_seconds=max(
                0.0, time.monotonic() - self._train_t0 - (self.busy_s - self._train_busy0)
            ),
            epoch_samples=self._epoch_samples,
        )
        self._hand_off(sync, overlap=not blocking)
        plan.held()
        if blocking:
            self._settle()

    def _sync(self, sync: p.BarrierSync) -> None:
        """A blocking barrier outside the epoch's plan (the start-up sync, fetching the final
        weights): upload, wait for the round's global weights and load them exactly."""
        self._hand_off(sync, overlap=False)
        self._settle()

    def _hand_off(self, sync: p.BarrierSync, *, overlap: bool, whole: bool = False) -> None:
        """Give the network thread this barrier's upload; with ``overlap`` the weights are
        copied first (training changes them meanwhile), otherwise the caller waits.

        At the start-up sync a node whose session already has weights sends none (it names
        its own by sha256, and is answered with "same" when they are the session's);
        ``whole`` sends them anyway (the coordinator lost its weights and asked)."""
        with self._busy("handoff_s"):
            weights = self._weights
            assert weights is not None, "the session's config sets how weights travel"
            taken = snapshot(self._pl) if overlap else local_state(self._pl)
            config = self.config
            # At the start-up sync (or a later fetch of the session's weights, also round 0):
            # the session has weights when it said so, or when this node already holds some.
            has = self._held_round >= 0 or (config is not None and config.has_weights)
            empty = sync.round == 0 and not whole and has

            def prepare() -> tuple[p.BarrierSync, bytes]:
                # On the network thread: the payload is built from the copy taken above.
                upload = weights.upload(taken, sync.round)
                marked = msgspec.structs.replace(
                    sync,
                    delta=upload.delta,
                    base_round=upload.base_round,
                    base_sha256=upload.base_sha256,
                )
                return marked, b"" if empty else upload.payload

            def receive(ready: p.BarrierReady, blob: bytes) -> Received:
                return weights.receive(
                    ready.round,
                    blob,
                    ready.sha256,
                    payload=ready.payload,
                    contributed=ready.contributed,
                )

            future = self._runtime.hand_off(prepare, receive)
            self._inflight = _InFlight(
                future, taken if overlap else None, sync, time.monotonic(), self._steps
            )
            self._samples = 0
            self._train_t0, self._train_busy0 = time.monotonic(), self.busy_s

    def _poll(self) -> None:
        """Between optimizer steps: apply the round in flight if its weights have come, and
        follow a re-plan of the epoch if one has."""
        inflight = self._inflight
        if inflight is not None and inflight.future.done():
            self._settle()
        replan = self._runtime.replan()
        if replan is not None:
            self._follow(replan)

    def _settle(self) -> None:
        """Wait for the round in flight, if any, and apply its global weights."""
        inflight = self._inflight
        if inflight is None:
            return
        refetched: tuple[p.BarrierReady, Received] | None = None
        with self._busy("wait_s") as waited:
            try:
                delivery = inflight.future.result()
            except SessionFinished as done:
                self._inflight = None
                raise SessionError(
                    f"the session finished at round {done.final_round} while this node was "
                    "still training (it was left behind); the final weights are the "
                    f"coordinator's checkpoint {done.checkpoint or 'of that round'}",
                    code="finished",
                ) from None
            except SessionError as exc:
                self._inflight = None
                if exc.code != "need_weights":
                    raise
                delivery = None
            except WeightsMismatch as exc:
                # Should never happen (the coordinator applies the same change, bit for bit);
                # if it does, nothing was taken from the answer: fetch the whole weights.
                log.warning("%s; fetching the round's whole weights", exc)
                refetched = self._refetch(inflight.sync.epoch)
                delivery = None
            except BaseException:
                self._inflight = None
                raise
        self._inflight = None
        if delivery is None and refetched is None:
            # The coordinator has no weights after all (it lost them): send ours.
            self._hand_off(inflight.sync, overlap=False, whole=True)
            self._settle()
            return
        self._apply(inflight, delivery, refetched, waited())

    def _refetch(self, epoch: int) -> tuple[p.BarrierReady, Received]:
        """The session's current global weights, whole (a start-up sync that offers none)."""
        weights = self._weights
        assert weights is not None
        ready, blob = self._runtime.barrier(p.BarrierSync(round=0, epoch=epoch), b"")
        return ready, weights.receive(ready.round, blob, ready.sha256, payload=ready.payload)

    def _apply(
        self,
        inflight: _InFlight,
        delivery: Delivery[Received] | None,
        refetched: tuple[p.BarrierReady, Received] | None,
        wait: float,
    ) -> None:
        """Fold the round's global weights into the module and record the barrier."""
        if delivery is not None:
            ready, got = delivery.ready, delivery.weights
            sync, sent, received = delivery.sync, len(delivery.payload), len(delivery.blob)
        else:
            assert refetched is not None
            ready, got = refetched
            sync, sent, received = inflight.sync, 0, len(got.blob)
        contributed = ready.contributed if delivery is not None else False
        module = self._pl
        with self._busy("apply_s"):
            if inflight.taken is None or ready.finished:
                # Blocking (nothing trained since the upload), or the session's final weights
                # (a straggler: nothing more to train): exactly the round's weights.
                load_in_place(module, got.weights)
            else:
                apply_in_place(module, got.weights, inflight.taken)
        held_round = got.round  # the parameters are now based on this round's weights
        self._held_round = held_round
        if self.checkpoint_dir is not None:
            keep_round_copy(self.checkpoint_dir, held_round, got.blob)
        self.finished = ready.finished
        # One entry per barrier; "round" is the round whose global weights came back.
        self.history.append(
            {
                "round": held_round,
                "contributed": contributed,
                "epoch": sync.epoch,
                "step": inflight.step,  # optimizer steps of this fit when the barrier was held
                "finished": ready.finished,
                "samples": sync.samples,
                "wait_s": wait,
                "round_trip_s": time.monotonic() - inflight.handed_at,
                "overlapped": inflight.taken is not None,
                "bytes_sent": sent,
                "bytes_received": received,
                "payload": got.payload,
                "sha256": ready.sha256,
            }
        )
        if delivery is not None:
            self._on_delivery(delivery)
        log.info(
            "barrier round=%d contributed=%s payload=%s wait_s=%.3f overlapped=%s samples=%d",
            held_round,
            contributed,
            got.payload,
            wait,
            inflight.taken is not None,
            sync.samples,
        )
        runtime = self._runtime
        self._log_metrics(
            {
                "drift/round": float(held_round),
                "drift/barrier_wait_s": wait,
                "drift/bytes_sent": float(runtime.bytes_sent),
                "drift/bytes_received": float(runtime.bytes_received),
                "drift/samples_per_round": float(sync.samples),
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
            log.warning("the session finished at round %d; stopping", held_round)
            self._end_training()

    def _on_delivery(self, delivery: Delivery[Received]) -> None:
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
        with self._busy("replan_s"):
            overrun = sampler.update(a.ranges)
            self.assignment = a
            _follow_epoch_length(self._pl.trainer, len(loader))
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

    @contextmanager
    def _busy(self, what: str) -> Iterator[Any]:
        """Count the time of the ``with`` body as ``timing[what]`` (not training)."""
        t0 = time.monotonic()
        spent = [0.0]
        try:
            yield lambda: spent[0]
        finally:
            spent[0] = time.monotonic() - t0
            if not self._starting:
                self.timing[what] += spent[0]
                self.busy_s += spent[0]

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
        # weights the node held ("round"). ``samples_since_round`` is 0 when the weights are
        # exactly that round's (saved at a barrier or an epoch's end); otherwise they are
        # local, mid-round weights.
        inflight = self._inflight.sync.samples if self._inflight is not None else 0
        checkpoint["drift"] = {
            "round": self._held_round,
            "session": self.config.session_id if self.config else "",
            "samples_since_round": self._samples + inflight,
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
        self._inflight = None
        if self.runtime is not None:
            self.runtime.close(reason)
            self.runtime = None


def _follow_epoch_length(trainer: Any, batches: int) -> None:
    """Make Lightning's running epoch ``batches`` long (the sampler's work was re-planned).

    Lightning reads an epoch's length once, at its start: a sampler that yields more is cut
    off at the old length, and one that yields fewer ends the epoch without its end-of-epoch
    validation. So the fit loop's length, the data fetcher's and the batch that triggers
    validation are all set to the new one (a ``limit_train_batches`` still caps it)."""
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif isinstance(limit, float) and limit < 1.0:
        batches = int(batches * limit)
    loop = trainer.fit_loop
    loop.max_batches = batches
    fetcher = getattr(loop, "_data_fetcher", None)
    if fetcher is not None and getattr(fetcher, "length", None) is not None:
        fetcher.length = batches
        fetcher.done = fetcher.fetched >= batches
    interval = trainer.val_check_interval
    if getattr(trainer, "_val_check_time_interval", None) is None and isinstance(interval, float):
        trainer.val_check_batch = max(1, int(batches * interval))


def _explicitly_several(devices: list[torch.device]) -> bool:
    """True when several devices can only have come from an explicit ``Trainer(devices=N)``.

    ``devices="auto"`` resolves one CPU or MPS device, and every CUDA device of the machine;
    fewer than every CUDA device (or several CPUs) means the user asked for them."""
    kind = devices[0].type
    available = torch.cuda.device_count() if kind == "cuda" else 1
    return len(devices) != available


class _EpochEndBarriers(Callback):
    """Calls the strategy at each training epoch's end (strategies get no such hook)."""

    def __init__(self, strategy: DriftStrategy) -> None:
        self.strategy = strategy

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy._finish_epoch()


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
        self.strategy._reached_max_steps()


def _why_stopping(trainer: Any) -> str:  # Any: Trainer.callbacks is untyped
    """What a stop request says about why Lightning was asked to stop."""
    watchers = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    if watchers:
        what = ", ".join(f"EarlyStopping(monitor={c.monitor!r})" for c in watchers)
        return f"trainer.should_stop was set; callbacks: {what}"
    return "trainer.should_stop was set (a callback or the module)"


def _find_token(
    given: SecretStr | str | None, token_file: str | None, *, required: bool = True
) -> str | None:
    """The token a DriftStrategy joins with (see the class docstring for the order); None
    when there is none and none is ``required`` (a node that names its coordinator by id)."""
    token = find_token(given, token_file=token_file)
    if not token and required:
        raise ConfigError(
            "DriftStrategy needs an invitation token: set "
            f"{TOKEN_ENV} (the token or a file holding it) or {TOKEN_FILE_ENV}, or pass "
            "DriftStrategy(token_file=...) or token=...; `drift-coord serve` prints one and "
            "writes it to STATE_DIR/node.token (or name the coordinator by id with "
            "peer=..., if it lists this node's id)"
        )
    return token


def _accelerator_for(device: torch.device) -> Accelerator:
    if device.type == "cuda":
        return CUDAAccelerator()
    if device.type == "mps":
        return MPSAccelerator()
    return CPUAccelerator()


DriftStrategy.register_strategies(StrategyRegistry)
