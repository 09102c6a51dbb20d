"""``DriftStrategy``: train one model across unlike machines from a Lightning ``Trainer``.

Each machine runs one node: a single-device strategy with no torch.distributed process group.
The strategy only connects Lightning to the node's parts:

- when the train dataloader is set up (first in ``fit``), the node joins the session
  (:class:`~lightning_drift.node.runtime.NodeRuntime`), syncs to the coordinator's global
  weights (round 0 or the current round) and, every epoch, swaps the dataloader's sampler for
  the shard the coordinator assigned (:class:`~lightning_drift.node.shards.ShardSampler`);
- after each optimizer step it counts towards its barrier points
  (:class:`~lightning_drift.node.barriers.EpochBarriers`); at a barrier it uploads its weights
  (:mod:`lightning_drift.node.weights`), waits for the round's global weights and copies them
  into the existing parameters, so parameter identity and the local optimizer state are kept
  (as DiLoCo does);
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
from collections.abc import Sized
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
from lightning_drift.auth import (
    MASKED_TOKEN,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    node_identity,
    read_token_file,
    token_from_environment,
    token_text,
)
from lightning_drift.errors import ConfigError, SessionError, SessionFinished
from lightning_drift.hardware import choose_device, describe, memory_now, node_info_fields
from lightning_drift.node.barriers import EpochBarriers, contributing_round, steps_per_epoch
from lightning_drift.node.shards import ShardSampler
from lightning_drift.node.weights import (
    GlobalWeights,
    WeightsMismatch,
    keep_round_copy,
    load_in_place,
    local_state,
    model_fingerprint,
)
from lightning_drift.peers import parse_peer

if TYPE_CHECKING:
    # A real import of these would run inside Lightning's own package import (see
    # lightning_drift/_lightning_hook.py); the runtime, and with it iroh, loads when a node
    # joins, not whenever Lightning does.
    from lightning.pytorch import LightningModule, Trainer

    from lightning_drift.node.runtime import NodeRuntime

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
    ) -> None:
        if listen is not None:
            if not peer or _token_given(token, token_file):
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

        self.runtime: NodeRuntime | None = None
        self.config: p.TrainConfig | None = None
        self.assignment: p.ShardAssignment | None = None
        self.history: list[dict[str, Any]] = []  # one entry per barrier, for tests and logs
        self._parallel: list[torch.device] = []
        self._weights: GlobalWeights | None = None  # set when the session's config arrives
        self._barriers: EpochBarriers | None = None  # the current epoch's barrier points
        self._samples = 0  # samples trained since the last barrier
        self._steps = 0  # optimizer steps in this fit
        self._train_t0 = time.monotonic()  # start of this round's training (after a barrier)
        self._last_loss: torch.Tensor | float | None = None
        self._last_report = 0.0
        self._rate_t0 = time.monotonic()
        self._rate_samples = 0
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
            if self._runtime.held_round < done.final_round:
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
        log.info(
            "shard epoch=%d start=%d stop=%d rounds=%d first_round=%d",
            a.epoch,
            a.start,
            a.stop,
            a.rounds,
            a.first_round,
        )
        self._log_metrics({"drift/shard_size": float(a.stop - a.start), "drift/epoch": a.epoch})
        # A stop asked for at the last epoch's end (EarlyStopping in on_train_epoch_end), or
        # decided meanwhile, is held here, before the epoch trains anything.
        self._hold_due_barriers()
        if self.finished:
            return _update_dataloader(dataloader, ShardSampler.empty(), mode=RunningStage.TRAINING)
        return _update_dataloader(dataloader, sampler, mode=RunningStage.TRAINING)

    def _join(self, dataset_size: int, batch_size: int = 0, samples_per_step: int = 0) -> None:
        """Join the session, take its settings, and hold the start-up sync (round 0).

        ``batch_size`` and ``samples_per_step`` (batch size × accumulate_grad_batches) let
        the coordinator cut shards in whole optimizer steps of this node."""
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
                float(self.runtime.held_round + 1),
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
        if plan.total_steps is None:  # the loader's length is known from the first step on
            plan.total_steps = self._steps_per_epoch()
        plan.step()
        self._hold_due_barriers()
        now = time.monotonic()
        if now - self._last_report >= self._progress_every:
            self._report(now)

    def _finish_epoch(self) -> None:
        """Hold the epoch's remaining barriers now if fewer optimizer steps ran than the
        loader promised (manual optimization, skipped steps): the coordinator's rounds must
        not wait for a barrier this node would never reach."""
        plan = self._barriers
        if self.runtime is None or plan is None or self.finished:
            return
        while plan.owed() and not self.finished:
            log.info("epoch ended before barrier %d; holding it now", plan.done + 1)
            self._barrier()
        # A stop asked for during the epoch's last validation (EarlyStopping on
        # on_validation_end) is held now, before the epoch's checkpoint is saved.
        self._hold_due_barriers()

    # -- stopping: a session decision ----------------------------------------------------------

    def _hold_due_barriers(self) -> None:
        """Hold every barrier the plan says is due now, the session's final one included
        (after taking any stop request into the plan: :meth:`_plan_stop`)."""
        plan = self._barriers
        if self.runtime is None or plan is None:
            return
        self._plan_stop()
        while plan.due() and not self.finished:
            self._barrier()

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
        if decision is not None and not plan.stopped and runtime.held_round < decision.round:
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
            shard_size=self.assignment.stop - self.assignment.start,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            automatic=self._pl.automatic_optimization,
        )

    def _loss(self) -> float | None:
        if self._last_loss is None:
            return None
        return float(self._last_loss)

    def _report(self, now: float) -> None:
        runtime = self._runtime
        elapsed = max(1e-6, now - self._rate_t0)
        used, peak = memory_now(self.root_device)
        runtime.report(
            p.TrainProgress(
                round=runtime.held_round + 1,  # the round this node is training towards
                epoch=self._pl.trainer.current_epoch,
                step=self._steps,
                samples=self._samples,
                loss=self._loss(),
                samples_per_s=self._rate_samples / elapsed,
                vram_used=used,
                vram_peak=peak,
            )
        )
        self._last_report = now
        self._rate_t0 = now
        self._rate_samples = 0

    # -- barriers ----------------------------------------------------------------------------------

    def _barrier(self) -> None:
        """Hold the epoch's next barrier: upload, wait for the round, load its weights."""
        trainer = self._pl.trainer
        runtime = self._runtime
        plan = self._barriers
        assert plan is not None
        sync = p.BarrierSync(
            round=contributing_round(runtime.held_round, plan.scheduled_round),
            epoch=trainer.current_epoch,
            samples=self._samples,
            steps=plan.steps,
            loss=self._loss(),
            # Training time of this round only: the coordinator measures pace from it.
            train_seconds=time.monotonic() - self._train_t0,
        )
        try:
            self._sync(sync)
        except SessionFinished as done:
            raise SessionError(
                f"the session finished at round {done.final_round} while this node was still "
                f"training (it was left behind); the final weights are the coordinator's "
                f"checkpoint {done.checkpoint or 'of that round'}",
                code="finished",
            ) from None
        plan.held()
        if self.finished and (
            plan.stopped or plan.owed() or trainer.current_epoch + 1 < (trainer.max_epochs or 0)
        ):
            # The session stopped early, or a straggler was answered with the session's final
            # weights: nothing left to train.
            log.warning("the session finished at round %d; stopping", runtime.held_round)
            self._end_training()

    def _sync(self, sync: p.BarrierSync) -> None:
        """Upload our weights (or their change) for ``sync.round``, wait for the round's global
        weights (whole, or rebuilt from their change) and load them in place."""
        module = self._pl
        runtime = self._runtime
        weights = self._weights
        assert weights is not None, "the session's config sets how weights travel"
        upload = weights.upload(local_state(module), sync.round)
        sync = msgspec.structs.replace(
            sync,
            delta=upload.delta,
            base_round=upload.base_round,
            base_sha256=upload.base_sha256,
        )
        payload = upload.payload
        if sync.round == 0 and self.config is not None and self.config.has_weights:
            # The session has weights: it answers with them (or "same", when ours are those);
            # ours are needed only if it has lost them.
            payload = b""
        t0 = time.monotonic()
        try:
            ready, blob = runtime.barrier(sync, payload)
        except SessionError as exc:
            if exc.code != "need_weights":
                raise
            ready, blob = runtime.barrier(sync, upload.payload)
        sent, received = len(payload), len(blob)
        contributed = ready.contributed
        try:
            got = weights.receive(
                ready.round,
                blob,
                ready.sha256,
                payload=ready.payload,
                contributed=ready.contributed,
            )
        except WeightsMismatch as exc:
            # Should never happen (the coordinator applies the same change, bit for bit);
            # if it does, nothing was taken from the answer: fetch the whole weights.
            log.warning("%s; fetching the round's whole weights", exc)
            ready, blob = runtime.barrier(p.BarrierSync(round=0, epoch=sync.epoch), b"")
            received += len(blob)
            got = weights.receive(ready.round, blob, ready.sha256, payload=ready.payload)
        wait = time.monotonic() - t0
        held_round = got.held_round  # the node now holds this round's global weights
        load_in_place(module, got.weights)
        if self.checkpoint_dir is not None:
            keep_round_copy(self.checkpoint_dir, held_round, got.blob)
        self.finished = ready.finished
        # One entry per barrier; "round" is the round whose global weights came back.
        self.history.append(
            {
                "round": held_round,
                "contributed": contributed,
                "epoch": sync.epoch,
                "step": self._steps,  # optimizer steps of this fit when the barrier was held
                "finished": ready.finished,
                "samples": sync.samples,
                "wait_s": wait,
                "bytes_sent": sent,
                "bytes_received": received,
                "payload": got.payload,
                "sha256": ready.sha256,
            }
        )
        log.info(
            "barrier round=%d contributed=%s payload=%s wait_s=%.3f samples=%d",
            held_round,
            contributed,
            got.payload,
            wait,
            sync.samples,
        )
        self._log_metrics(
            {
                "drift/round": float(held_round),
                "drift/barrier_wait_s": wait,
                "drift/bytes_sent": float(runtime.bytes_sent),
                "drift/bytes_received": float(runtime.bytes_received),
                "drift/samples_per_round": float(sync.samples),
            }
        )
        self._samples = 0
        # Pace is measured over training only: waiting at the barrier does not count.
        self._train_t0 = self._rate_t0 = time.monotonic()
        self._rate_samples = 0

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
        checkpoint["drift"] = {
            "round": self.runtime.held_round if self.runtime else -1,
            "session": self.config.session_id if self.config else "",
            "samples_since_round": self._samples,
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
        if self.runtime is not None:
            self.runtime.close(reason)
            self.runtime = None


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


def _token_given(given: SecretStr | str | None, token_file: str | None) -> bool:
    """Whether a token was passed (a masked one from a saved config does not count)."""
    value = given.get_secret_value() if isinstance(given, SecretStr) else given
    return bool(token_file) or bool(value and value.strip() and value.strip() != MASKED_TOKEN)


def _find_token(
    given: SecretStr | str | None, token_file: str | None, *, required: bool = True
) -> str | None:
    """The token a DriftStrategy joins with (see the class docstring for the order); None
    when there is none and none is ``required`` (a node that names its coordinator by id)."""
    value = given.get_secret_value() if isinstance(given, SecretStr) else given
    if value is not None and value.strip() == MASKED_TOKEN:
        # A config saved by LightningCLI, run again: its token was masked on purpose.
        log.info("the config's token is masked; looking for it in the environment")
        value = None
    token = token_text(value) if value and value.strip() else None
    if token is None and token_file:
        token = read_token_file(token_file)
    token = token or token_from_environment()
    if not token and required:
        raise ConfigError(
            "DriftStrategy needs an invitation token: set "
            f"{TOKEN_ENV} (the token or a file holding it) or {TOKEN_FILE_ENV}, or pass "
            "DriftStrategy(token_file=...) or token=...; `drift-coord serve` prints one and "
            "writes it to STATE_DIR/node.token (or name the coordinator by id with "
            "peer=..., if it lists this node's id)"
        )
    return token or None


def _accelerator_for(device: torch.device) -> Accelerator:
    if device.type == "cuda":
        return CUDAAccelerator()
    if device.type == "mps":
        return MPSAccelerator()
    return CPUAccelerator()


DriftStrategy.register_strategies(StrategyRegistry)
