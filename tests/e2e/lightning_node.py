"""A user's own Lightning program, run as one node of an end-to-end test.

A small regression network (optionally with BatchNorm) trained by a plain ``Trainer`` with
``DriftStrategy`` (token from ``DRIFT_TOKEN``), with the Lightning features the tests exercise
switched on by flags: EarlyStopping at a given epoch, a batch size of its own, gradient
accumulation, ``max_steps``, a ``Tuner.lr_find`` before ``fit``. It writes ``final.safetensors``
(the weights it ends with) and ``report.json`` (what the test checks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import msgspec
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.tuner import Tuner
from lightning_drift_examples.mock_train import make_regression
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from lightning_drift import DriftStrategy


class Net(L.LightningModule):
    def __init__(self, batchnorm: bool = False, lr: float = 0.05, stop_at_epoch: int = -1) -> None:
        super().__init__()
        self.lr = lr
        self.stop_at_epoch = stop_at_epoch
        layers: list[nn.Module] = [nn.Linear(8, 16)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.ReLU(), nn.Linear(16, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))
        # What the EarlyStopping below watches: 1 from epoch `stop_at_epoch` on.
        reached = 0 <= self.stop_at_epoch <= self.current_epoch
        self.log("stop_signal", float(reached))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Data(L.LightningDataModule):
    def __init__(self, samples: int, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_set = make_regression(samples, 8, seed=0, split=0)
        self.val_set = make_regression(64, 8, seed=0, split=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=32)


class Recorder(Callback):
    """Every training batch's size, per epoch, and whether the fit's own epochs ran."""

    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.setdefault(trainer.current_epoch, []).append(len(batch[0]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="node")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batchnorm", action="store_true")
    ap.add_argument("--stop-at-epoch", type=int, default=-1, help="EarlyStopping fires then")
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--lr-find", action="store_true", help="Tuner(trainer).lr_find before fit")
    args = ap.parse_args()
    torch.manual_seed(sum(args.name.encode()))  # unlike inits: round 0 must unify them
    args.out.mkdir(parents=True, exist_ok=True)
    model = Net(batchnorm=args.batchnorm, stop_at_epoch=args.stop_at_epoch)
    data = Data(args.samples, args.batch_size)
    rec = Recorder()
    callbacks: list[Callback] = [rec]
    if args.stop_at_epoch >= 0:
        # A real EarlyStopping: it sets trainer.should_stop once stop_signal reaches 1.
        callbacks.append(EarlyStopping(monitor="stop_signal", mode="max", stopping_threshold=0.5))
    strategy = DriftStrategy(name=args.name, calibration_seconds=0.05, progress_every=0.5)
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(args.out),
    )
    found_lr = None
    if args.lr_find:
        finder = Tuner(trainer).lr_find(model, datamodule=data, num_training=20)
        found_lr = finder.suggestion() if finder is not None else None
    trainer.fit(model, datamodule=data)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(args.out / "final.safetensors"),
    )
    report = {
        "history": msgspec.to_builtins(strategy.history),
        "batches": {str(k): v for k, v in rec.batches.items()},
        "node_key": strategy.node_key,
        "current_epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "found_lr": found_lr,
        "finished": strategy.finished,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
