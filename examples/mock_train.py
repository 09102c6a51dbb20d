"""The quickest thing a drift session can train: seeded linear regression, seconds on a CPU.

Run one node of a session (the token comes from ``drift-coord serve``)::

    python examples/mock_train.py --token eyJ... --epochs 2

``MockModel`` and ``MockData`` are importable (``lightning_drift_examples.mock_train``, or
``examples.mock_train`` from the repository root) for tests that build their own Trainer.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger("mock_train")


class MockModel(L.LightningModule):
    """``y = w·x + b`` fitted with plain SGD (no optimizer state, so averaging is easy to check).

    Args:
        in_features: length of each input vector; must match ``MockData.in_features``.
        lr: SGD learning rate.
    """

    def __init__(self, in_features: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("val_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_regression(n: int, in_features: int, seed: int, split: int = 0) -> TensorDataset:
    """``n`` samples of ``y = x·w + 0.5 + noise``, all drawn from ``seed`` and ``split``.

    The true ``w`` comes from ``seed`` alone, so the splits (train 0, val 1) of a seed share it.
    """
    w = torch.randn(in_features, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed * 1000 + 1 + split)
    x = torch.randn(n, in_features, generator=gen)
    y = x @ w + 0.5 + 0.01 * torch.randn(n, generator=gen)
    return TensorDataset(x, y)


class MockData(L.LightningDataModule):
    """A fixed synthetic regression set: identical on every machine for the same arguments.

    Args:
        samples: training samples (the session's dataset size).
        val_samples: validation samples, drawn separately from the same true ``w``.
        in_features: length of each input vector.
        batch_size: samples per batch.
        seed: the seed of the data (not of the model).
    """

    def __init__(
        self,
        samples: int = 256,
        val_samples: int = 64,
        in_features: int = 8,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.batch_size = batch_size
        self.train_dataset = make_regression(samples, in_features, seed, split=0)
        self.val_dataset = make_regression(val_samples, in_features, seed, split=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train MockModel as one node of a drift session.")
    ap.add_argument("--token", default=None, help="invitation token (default: $DRIFT_TOKEN)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=256, help="training samples (dataset size)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    ap.add_argument("--name", default=None, help="this node's label (default: hostname)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the local initial weights")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> MockModel:
    """Train ``MockModel`` as one node of a drift session; returns the trained model."""
    from lightning_drift import DriftStrategy

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model = MockModel(lr=args.lr)
    data = MockData(samples=args.samples, batch_size=args.batch_size)
    trainer = L.Trainer(
        strategy=DriftStrategy(token=args.token, device=args.device, name=args.name),
        # One device per node: the default devices="auto" takes every GPU of the machine, which
        # DriftStrategy refuses; --device picks which one.
        devices=1,
        max_epochs=args.epochs,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    log.info(
        "done epochs=%d train_loss=%s val_loss=%s",
        args.epochs,
        trainer.callback_metrics.get("train_loss"),
        trainer.callback_metrics.get("val_loss"),
    )
    return model


if __name__ == "__main__":
    main()
