"""``DriftStrategy``: train one model across unlike machines from a Lightning ``Trainer``.

Each machine runs one node: a single-device strategy with no torch.distributed process group.
The strategy only connects Lightning to the node runtime:

- when the train dataloader is set up (first in ``fit``), the node joins the session, syncs
  to the coordinator's global weights (round 0 or the current round) and, every epoch, swaps
  the dataloader's sampler for the shard the coordinator assigned;
- after each optimizer step it counts towards its barrier points (the coordinator fixes how
  many rounds an epoch has; the node spreads its shard's steps evenly over them); at a
  barrier it uploads its weights, waits for the round's global weights and copies them into
  the existing parameters, so parameter identity and the local optimizer state are kept
  (as DiLoCo does);
- the last barrier of the last epoch is the final one: every node ends holding the
  coordinator's final checkpoint.

No network is touched in ``__init__``; the runtime connects in ``process_dataloader`` and
closes in ``teardown``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lightning_drift import __version__
from lightning_drift import protocol as p
from lightning_drift.errors import ConfigError, SessionError, SessionFinished

if TYPE_CHECKING:  # a real import here would run inside Lightning's own package import
    from lightning.pytorch import LightningModule

log = logging.getLogger(__name__)

TOKEN_ENV = "DRIFT_TOKEN"


class ShardSampler(Sampler[int]):
    """Yields this node's shard of one epoch: positions ``start:stop`` of the epoch's permutation."""

    def __init__(self, indices: torch.Tensor) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)


def model_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the state dict's names, shapes and dtypes: equal models, equal fingerprints."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()


class DriftStrategy(SingleDeviceStrategy):
    """Lightning strategy for one node of a drift session (one device per machine).

    Args:
        token: the invitation token printed by ``drift-coord serve``; when ``None`` it is read
            from the ``DRIFT_TOKEN`` environment variable.
        device: ``"auto"`` (let Lightning's accelerator pick: CUDA/ROCm, then MPS, then CPU),
            or an explicit torch device such as ``"cuda:1"``, ``"mps"`` or ``"cpu"``.
        sync_every: leave unset to follow the coordinator's schedule (the epoch's barriers
            spread evenly over its steps). When set, the epoch's barriers come every this many
            optimizer steps instead, earlier than scheduled; the epoch's last barrier always
            stays on its last step. The number of barriers is the coordinator's.
        connect_timeout: seconds to wait for the coordinator when joining.
        reconnect_timeout: seconds to keep retrying when the coordinator goes away.
        mode: ``"local"`` (relays off; loopback and LANs) or ``"internet"`` (relays and hole
            punching).
        relay_urls: custom iroh relay URLs for internet mode.
        coordinator_addr: dial the coordinator at this ``host:port`` instead of the address
            in the token (a forwarded port, a proxy, a new IP); its key is still checked.
        checkpoint_dir: where the node keeps a copy of each global round's weights
            (``round-NNNNNN.safetensors``); ``None`` keeps none.
        name: a label shown in the coordinator's view (the hostname by default).
        progress_every: seconds between progress reports to the coordinator; ``None`` uses
            the interval the coordinator asks for (``TrainConfig.progress_every_s``).
        calibration_seconds: how long the start-up calibration benchmark runs.
    """

    strategy_name = "drift"

    def __init__(
        self,
        token: str | None = None,
        device: str = "auto",
        sync_every: int | None = None,
        connect_timeout: float = 30.0,
        reconnect_timeout: float = 300.0,
        mode: str = "local",
        relay_urls: list[str] | None = None,
        coordinator_addr: str | None = None,
        checkpoint_dir: str | None = None,
        name: str | None = None,
        progress_every: float | None = None,
        calibration_seconds: float = 0.5,
    ) -> None:
        token = token or os.environ.get(TOKEN_ENV)
        if not token:
            raise ConfigError(
                "DriftStrategy needs an invitation token: pass DriftStrategy(token=...) or set "
                f"{TOKEN_ENV}; `drift-coord serve` prints one and writes it to STATE_DIR/node.token"
            )
        if mode not in ("local", "internet"):
            raise ConfigError(f"mode must be 'local' or 'internet', not {mode!r}")
        accelerator: Accelerator | None = None
        root = torch.device("cpu")
        if device != "auto":
            from lightning_drift.hardware import choose_device

            root = choose_device(device)
            accelerator = _accelerator_for(root)
        super().__init__(device=root, accelerator=accelerator)
        self.token = token.strip()
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

        self.runtime: Any = None
        self.config: p.TrainConfig | None = None
        self.assignment: p.ShardAssignment | None = None
        self.history: list[dict[str, Any]] = []  # one entry per barrier, for tests and logs
        self._parallel: list[torch.device] = []
        self._global: dict[str, torch.Tensor] | None = None  # for delta uploads
        self._global_round = -1  # the round of self._global
        self._epoch_steps = 0
        self._epoch_total_steps: int | None = None
        self._barriers_done = 0
        self._samples = 0
        self._steps = 0
        self._train_t0 = time.monotonic()  # start of this round's training (after a barrier)
        self._last_loss: torch.Tensor | float | None = None
        self._last_report = 0.0
        self._rate_t0 = time.monotonic()
        self._rate_samples = 0
        self.finished = False
        self.node_key = ""
        self._resumed_from: dict[str, Any] | None = None  # the "drift" entry of a resumed .ckpt

    @property
    def _pl(self) -> LightningModule:
        module = self.lightning_module
        assert module is not None, "DriftStrategy used before Lightning attached a module"
        return module

    # -- registration and device checks -----------------------------------------------------------

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "drift",
            cls,
            description="Train across machines by averaging weights at barriers (token from DRIFT_TOKEN)",
            override=True,
        )

    # Lightning's accelerator connector hands every strategy the devices it resolved from
    # `Trainer(devices=..., accelerator=...)`. A drift node owns exactly one device.
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

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        # Every epoch needs a fresh dataloader over the epoch's shard.
        trainer.reload_dataloaders_every_n_epochs = 1
        if trainer.max_steps not in (-1, None):
            log.warning(
                "Trainer(max_steps=%s): a node that stops before its epoch's last barrier "
                "leaves the session's rounds without it; prefer max_epochs (the session's)",
                trainer.max_steps,
            )
        if not any(isinstance(c, _EpochEndBarriers) for c in trainer.callbacks):
            # First, so owed barriers are held before ModelCheckpoint saves the epoch's end.
            trainer.callbacks.insert(0, _EpochEndBarriers(self))

    def _finish_epoch(self) -> None:
        """Hold the epoch's remaining barriers now if fewer optimizer steps ran than the
        loader promised (manual optimization, skipped steps): the coordinator's rounds must
        not wait for a barrier this node would never reach."""
        if self.runtime is None or self.assignment is None or self.finished:
            return
        while self._barriers_done < self.assignment.rounds and not self.finished:
            log.info("epoch ended before barrier %d; holding it now", self._barriers_done + 1)
            self._barrier()

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self._pl.trainer
        if trainer.state.stage != RunningStage.TRAINING or not isinstance(dataloader, DataLoader):
            return dataloader
        dataset = dataloader.dataset
        if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
            raise ConfigError(
                "DriftStrategy shards a map-style dataset (one with __len__ and __getitem__); the "
                f"train dataset is a {type(dataset).__name__}. Wrap your data in a map-style "
                "Dataset so the coordinator can give each node its own indices."
            )
        if self.runtime is None:
            self._join(len(dataset))
        assert self.runtime is not None
        from lightning.pytorch.utilities.data import _update_dataloader

        try:
            a = self.runtime.shard(trainer.current_epoch)
        except SessionFinished as done:
            # We came back after the last round: the start-up sync already loaded the final
            # weights. Train nothing more and let the fit end normally.
            log.warning(
                "the session finished at round %d; this node holds its final weights",
                done.final_round,
            )
            self.finished = True
            trainer.should_stop = True
            empty = ShardSampler(torch.empty(0, dtype=torch.long))
            return _update_dataloader(dataloader, empty, mode=RunningStage.TRAINING)
        if a.epoch != trainer.current_epoch:
            self._jump_to_epoch(a.epoch)
        self.assignment = a
        from lightning_drift.scheduler import epoch_permutation

        perm = epoch_permutation(a.seed, a.epoch, len(dataset))
        sampler = ShardSampler(perm[a.start : a.stop])
        self._epoch_steps = 0
        self._epoch_total_steps = None
        self._barriers_done = 0
        log.info(
            "shard epoch=%d start=%d stop=%d rounds=%d first_round=%d",
            a.epoch,
            a.start,
            a.stop,
            a.rounds,
            a.first_round,
        )
        self._log_metrics({"drift/shard_size": float(a.stop - a.start), "drift/epoch": a.epoch})
        return _update_dataloader(dataloader, sampler, mode=RunningStage.TRAINING)

    def _join(self, dataset_size: int) -> None:
        from lightning_drift.hardware import node_info_fields
        from lightning_drift.node import NodeRuntime

        module = self._pl
        fingerprint = model_fingerprint(module)
        hw = node_info_fields(self.root_device, seconds=self.calibration_seconds)

        def info() -> p.NodeInfo:
            return p.NodeInfo(
                nonce="",
                dataset_size=dataset_size,
                model_fingerprint=fingerprint,
                **hw,
            )

        self.runtime = NodeRuntime(
            self.token,
            info,
            name=self.node_name,
            mode=self.mode,
            relay_urls=tuple(self.relay_urls),
            via=(self.coordinator_addr,) if self.coordinator_addr else (),
            connect_timeout=self.connect_timeout,
            reconnect_timeout=self.reconnect_timeout,
        )
        self.node_key = self.runtime.node_key
        config = self.runtime.start()
        self.config = config
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
            from lightning_drift.hardware import describe

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

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        from lightning.pytorch.utilities.data import extract_batch_size

        try:
            n = extract_batch_size(batch)
        except Exception:
            n = 1
        self._samples += n
        self._rate_samples += n

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        loss = out.get("loss") if isinstance(out, dict) else out
        if isinstance(loss, torch.Tensor):
            self._last_loss = loss.detach()
        if self.runtime is not None:
            # Lightning's progress bar shows which round this node is working towards.
            self._pl.log(
                "round",
                float(self.runtime.round + 1),
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )
        return out

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if optimizer is self.optimizers[0] if self.optimizers else True:
            self._after_step()
        return out

    def _after_step(self) -> None:
        if self.runtime is None or self.assignment is None:
            return
        self._steps += 1
        self._epoch_steps += 1
        total = self._steps_this_epoch()
        rounds = self.assignment.rounds
        while self._barriers_done < rounds:
            due = barrier_step(self._barriers_done + 1, total, rounds, self.sync_every)
            if self._epoch_steps < due:
                break
            self._barrier()
        now = time.monotonic()
        if now - self._last_report >= self._progress_every:
            self._report(now)

    def _steps_this_epoch(self) -> int:
        if self._epoch_total_steps is None:
            trainer = self._pl.trainer
            batches = trainer.num_training_batches
            if not math.isfinite(batches):  # a loader without __len__: one step per sample
                assert self.assignment is not None
                batches = self.assignment.stop - self.assignment.start
            if self._pl.automatic_optimization:
                steps = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
            else:
                steps = int(batches)
            self._epoch_total_steps = max(1, int(steps))
        return self._epoch_total_steps

    def _loss(self) -> float | None:
        if self._last_loss is None:
            return None
        return float(self._last_loss)

    def _report(self, now: float) -> None:
        from lightning_drift.hardware import memory_now

        elapsed = max(1e-6, now - self._rate_t0)
        used, peak = memory_now(self.root_device)
        self.runtime.report(
            p.TrainProgress(
                round=self.runtime.round + 1,
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
        trainer = self._pl.trainer
        assert self.assignment is not None
        # Barrier k of the epoch belongs to global round first_round + k - 1. A node that
        # joined late holds older weights than that, and a straggler that was answered with
        # newer ones is past it: rounds only ever move forward.
        target = self.assignment.first_round + self._barriers_done
        sync = p.BarrierSync(
            round=max(self.runtime.round + 1, target),
            epoch=trainer.current_epoch,
            samples=self._samples,
            steps=self._epoch_steps,
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
        self._barriers_done += 1
        if self.finished and (
            self._barriers_done < self.assignment.rounds
            or trainer.current_epoch + 1 < (trainer.max_epochs or 0)
        ):
            # A straggler answered with the session's final weights: nothing left to train.
            log.warning("the session finished at round %d; stopping", self.runtime.round)
            trainer.should_stop = True

    def _sync(self, sync: p.BarrierSync) -> None:
        """Upload our weights for ``sync.round``, wait for the global ones, load them in place."""
        from lightning_drift.aggregate import from_bytes, to_bytes

        module = self._pl
        assert self.config is not None
        local = {k: v.detach() for k, v in module.state_dict().items()}
        if sync.round > 0 and self.config.transfer_dtype == "bfloat16" and self._global is not None:
            delta = {
                # The global copy lives on the CPU, where the blob is decoded.
                k: (v.float().cpu() - self._global[k].float()).to(torch.bfloat16)
                if v.is_floating_point()
                else v
                for k, v in local.items()
            }
            payload = to_bytes(delta)
            sync.delta = True
            sync.base_round = self._global_round
        else:
            payload = to_bytes(local)
        t0 = time.monotonic()
        ready, blob = self.runtime.barrier(sync, payload)
        wait = time.monotonic() - t0
        if hashlib.sha256(blob).hexdigest() != ready.sha256:
            raise ConfigError(f"global weights of round {ready.round} do not match their checksum")
        weights = from_bytes(blob)
        with torch.no_grad():
            # load_state_dict copies into the existing tensors: parameters keep their identity
            # and the optimizer's state keeps pointing at them.
            module.load_state_dict(weights, strict=True)
        if self.config.transfer_dtype == "bfloat16":
            self._global = {k: v.clone() for k, v in weights.items()}
            self._global_round = ready.round
        if self.checkpoint_dir is not None:
            self._keep_copy(ready.round, blob)
        self.finished = ready.finished
        entry = {
            "round": ready.round,
            "contributed": ready.contributed,
            "samples": sync.samples,
            "wait_s": wait,
            "bytes_sent": len(payload),
            "bytes_received": len(blob),
            "sha256": ready.sha256,
        }
        self.history.append(entry)
        log.info(
            "barrier round=%d contributed=%s wait_s=%.3f samples=%d",
            ready.round,
            ready.contributed,
            wait,
            sync.samples,
        )
        self._log_metrics(
            {
                "drift/round": float(ready.round),
                "drift/barrier_wait_s": wait,
                "drift/bytes_sent": float(self.runtime.bytes_sent),
                "drift/bytes_received": float(self.runtime.bytes_received),
                "drift/samples_per_round": float(sync.samples),
            }
        )
        self._samples = 0
        # Pace is measured over training only: waiting at the barrier does not count.
        self._train_t0 = self._rate_t0 = time.monotonic()
        self._rate_samples = 0

    def _keep_copy(self, round_: int, blob: bytes) -> None:
        assert self.checkpoint_dir is not None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        from lightning_drift.fsutil import atomic_write

        atomic_write(self.checkpoint_dir / f"round-{round_:06d}.safetensors", blob)

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        try:
            trainer = self._pl.trainer
        except Exception:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # -- checkpoints and teardown ------------------------------------------------------------------

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        # The canonical checkpoint is the coordinator's; this file records which round it holds.
        # ``samples_since_round`` is 0 when the weights are exactly that round's global weights
        # (saved at a barrier or an epoch's end); otherwise they are local, mid-round weights.
        checkpoint["drift"] = {
            "round": self.runtime.round if self.runtime else -1,
            "session": self.config.session_id if self.config else "",
            "samples_since_round": self._samples,
            "version": __version__,
        }
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        drift = checkpoint.get("drift") if isinstance(checkpoint, dict) else None
        self._resumed_from = drift if isinstance(drift, dict) else None
        return checkpoint

    def teardown(self) -> None:
        self._close("teardown")
        super().teardown()

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


def barrier_step(k: int, total: int, rounds: int, sync_every: int | None = None) -> int:
    """After how many optimizer steps of an epoch barrier ``k`` (1-based) of ``rounds`` falls.

    The coordinator's schedule spreads the barriers evenly: ``ceil(k * total / rounds)``; when
    a shard gives fewer steps than rounds, several barriers fall on one step. ``sync_every``
    moves barriers earlier (every ``sync_every`` steps) but never the epoch's last barrier,
    which always falls on the epoch's last step, so every node ends each epoch (and the
    session) on the global weights.
    """
    due = math.ceil(k * total / rounds)
    if sync_every and k < rounds:
        due = min(due, k * sync_every)
    return due


class _EpochEndBarriers(Callback):
    """Calls the strategy at each training epoch's end (strategies get no such hook)."""

    def __init__(self, strategy: DriftStrategy) -> None:
        self.strategy = strategy

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.strategy._finish_epoch()


def _accelerator_for(device: torch.device) -> Accelerator:
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator

    if device.type == "cuda":
        return CUDAAccelerator()
    if device.type == "mps":
        return MPSAccelerator()
    return CPUAccelerator()


DriftStrategy.register_strategies(StrategyRegistry)
