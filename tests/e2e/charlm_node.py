"""One node of an end-to-end test: trains the tiny char-LM with DriftStrategy and records what
the test checks (shards per epoch, uploads of the last round, final weights, val losses)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from pathlib import Path

import lightning as L
import msgspec
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning_drift_examples.charlm import CharDataModule, CharLM
from safetensors.torch import save_file

from lightning_drift import DriftStrategy


class Recorder(Callback):
    def __init__(self) -> None:
        self.val_losses: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        v = trainer.callback_metrics.get("val_loss")
        if v is not None:
            self.val_losses.append(float(v))


class Slow(Callback):
    """Sleeps after every batch once round 1 is behind this node (keeps a session going)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(trainer.strategy.history) > 1:  # round 0 and round 1 are behind us
            time.sleep(self.seconds)


class Stall(Callback):
    """Makes this node a straggler once: one long pause in its first batch after round 1.

    The coordinator measured this node's pace in round 1, so its deadline for round 2 is about
    one round's work; the node sends no progress while it is paused, so nothing tells the
    coordinator to wait longer. A pause far longer than a round leaves it behind on any machine.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.done and len(trainer.strategy.history) > 1:
            self.done = True
            time.sleep(self.seconds)


class Slowdown(Callback):
    """Makes this node ``factor`` times slower from its first batch: after each batch it sleeps
    (factor - 1) times what the batch took to train (the strategy's own waits excluded)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.t0 = 0.0
        self.busy0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.t0, self.busy0 = time.monotonic(), trainer.strategy.busy_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        took = time.monotonic() - self.t0 - (trainer.strategy.busy_s - self.busy0)
        time.sleep(max(0.0, (self.factor - 1.0) * took))


class Gate(Callback):
    """Holds this node after each batch while ``dir/hold`` exists and ``dir/release`` does not
    (a test keeps the session from ending while another node restarts). Bounded: after
    ``limit`` seconds held it fails, naming the file it waited for."""

    def __init__(self, folder: Path, limit: float = 300.0) -> None:
        self.folder, self.limit = folder, limit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        hold, release = self.folder / "hold", self.folder / "release"
        end = time.monotonic() + self.limit
        while hold.exists() and not release.exists():
            if time.monotonic() > end:
                raise TimeoutError(f"held {self.limit:.0f}s and {release} never appeared")
            time.sleep(0.05)


class DieInFlight(Callback):
    """SIGKILLs this node while a round is in flight, once it holds round ``after`` or later,
    right after saving a Lightning checkpoint of its local (mid-round) weights."""

    def __init__(self, after: int, ckpt: Path) -> None:
        self.after = after
        self.ckpt = ckpt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        s = trainer.strategy
        inflight = s.round_in_flight
        if inflight is not None and inflight.overlapped and s.base_round >= self.after:
            trainer.save_checkpoint(str(self.ckpt))
            os.kill(os.getpid(), signal.SIGKILL)


class RecordingStrategy(DriftStrategy):
    """Keeps every shard assignment, every epoch's final work and every upload, for the test
    to check."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.shards: list[dict] = []
        self.worked: list[dict] = []  # per epoch: the work it ended with, and what it trained
        self.uploads: dict[int, tuple[bytes, int]] = {}

    def finish_epoch(self) -> None:
        super().finish_epoch()
        a = self.assignment
        if a is not None and (not self.worked or self.worked[-1]["epoch"] != a.epoch):
            self.worked.append(
                {
                    "epoch": a.epoch,
                    "ranges": a.ranges,
                    "seed": a.seed,
                    "revision": a.revision,
                    "trained": self.epoch_samples,
                }
            )

    def process_dataloader(self, dataloader):
        out = super().process_dataloader(dataloader)
        a = self.assignment
        if a is not None and (not self.shards or self.shards[-1]["epoch"] != a.epoch):
            self.shards.append(
                {
                    "epoch": a.epoch,
                    "start": a.start,
                    "stop": a.stop,
                    "ranges": a.ranges,
                    "seed": a.seed,
                    "rounds": a.rounds,
                }
            )
        return out

    def on_delivery(self, delivery) -> None:
        if delivery.ready.contributed:
            self.uploads[delivery.sync.round] = (delivery.payload, delivery.sync.samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--token", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-chars", type=int, default=30_000)
    ap.add_argument("--name", default="node")
    ap.add_argument("--slow", type=float, default=0.0, help="seconds to sleep after each batch")
    ap.add_argument("--stall", type=float, default=0.0, help="pause once after round 1 (seconds)")
    ap.add_argument("--ckpt-dir", type=Path, help="keep Lightning checkpoints (last.ckpt) here")
    ap.add_argument("--resume", type=Path, help="a .ckpt to resume from")
    ap.add_argument("--via", help="dial the coordinator at this host:port (e.g. a WAN proxy)")
    ap.add_argument("--round-copies", type=Path, help="keep every round's global weights here")
    ap.add_argument("--overlap", choices=("on", "off"), help="the node's own overlap setting")
    ap.add_argument("--slowdown", type=float, default=1.0, help="train this many times slower")
    ap.add_argument("--gate", type=Path, help="hold after each batch while gate/hold exists")
    ap.add_argument("--die-in-flight", type=int, default=-1, help="SIGKILL mid-overlap (round)")
    args = ap.parse_args()
    # Warnings as the library writes them; the data plane's fetches of whole weights too.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("lightning_drift.node.sharded").setLevel(logging.INFO)
    torch.manual_seed(hash(args.name) % 1000)  # different local inits: round 0 must unify them
    args.out.mkdir(parents=True, exist_ok=True)
    data = CharDataModule(batch_size=16, block_size=32, max_chars=args.max_chars)
    model = CharLM(d_model=32, n_layers=1, n_heads=2, block_size=32, lr=3e-3)
    strategy = RecordingStrategy(
        token=args.token,
        name=args.name,
        calibration_seconds=0.1,
        coordinator_addr=args.via,
        checkpoint_dir=str(args.round_copies) if args.round_copies else None,
        overlap=None if args.overlap is None else args.overlap == "on",
    )
    rec = Recorder()
    callbacks: list[Callback] = [rec]
    if args.slow:
        callbacks.append(Slow(args.slow))
    if args.stall:
        callbacks.append(Stall(args.stall))
    if args.slowdown > 1:
        callbacks.append(Slowdown(args.slowdown))
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=str(args.ckpt_dir), save_last=True))
    if args.gate:
        callbacks.append(Gate(args.gate))
    if args.die_in_flight >= 0:
        assert args.ckpt_dir, "--die-in-flight saves a checkpoint first: give --ckpt-dir"
        callbacks.append(DieInFlight(args.die_in_flight, args.ckpt_dir / "in-flight.ckpt"))
    trainer = L.Trainer(
        strategy=strategy,
        devices=1,
        max_epochs=args.epochs,
        callbacks=callbacks,
        enable_checkpointing=bool(args.ckpt_dir),
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data, ckpt_path=str(args.resume) if args.resume else None)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(args.out / "final.safetensors"),
    )
    last = max(strategy.uploads) if strategy.uploads else -1
    if last >= 0:
        (args.out / f"upload-{last:06d}.safetensors").write_bytes(strategy.uploads[last][0])
    report = {
        "shards": strategy.shards,
        "worked": strategy.worked,
        "timing": strategy.timing,
        "val_losses": rec.val_losses,
        "history": msgspec.to_builtins(strategy.history),
        "last_upload_round": last,
        "last_upload_samples": strategy.uploads[last][1] if last >= 0 else 0,
        "node_key": strategy.node_key,
        "dataset_size": len(data.train_dataset) if hasattr(data, "train_dataset") else None,
        "epochs_run": trainer.current_epoch,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
