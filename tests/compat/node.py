"""One node of a compatibility recipe: ``node.py --recipe NAME --out DIR --name a``.

Builds the recipe's program (``recipes.py``), fits it with ``DriftStrategy`` (the token from
``DRIFT_TOKEN``, or from ``--token-file`` once the coordinator has written it) and writes
what the test compares: ``final.safetensors`` (the weights after ``fit``),
``trained.safetensors`` (the weights at ``on_train_end``, before another callback swaps an
average in) and ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import msgspec
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import RECIPES, Context  # noqa: E402

from lightning_drift import DriftStrategy  # noqa: E402
from lightning_drift.fsutil import sha256_bytes  # noqa: E402


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors takes it: tied parameters copied apart."""
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def digest(weights: dict[str, torch.Tensor]) -> str:
    return sha256_bytes(
        b"".join(
            k.encode() + v.view(-1).view(torch.uint8).numpy().tobytes()
            for k, v in sorted(weights.items())
        )
    )


class Recorder(Callback):
    """The weights the fit trained (at ``on_train_end``, before a later callback swaps its
    average in), how often validation ran, and per epoch how many batches it trained and how
    often it validated (``{epoch: count}``)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.validations = 0
        self.epochs: dict[int, dict[str, int]] = {}

    def tally(self, trainer: L.Trainer, what: str) -> None:
        epoch = self.epochs.setdefault(trainer.current_epoch, {"batches": 0, "validations": 0})
        epoch[what] += 1

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.tally(trainer, "batches")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validations += 1
            self.tally(trainer, "validations")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        save_file(tensors(pl_module), str(self.out / "trained.safetensors"))


def token(path: Path | None, timeout: float = 60.0) -> None:
    """Wait for the coordinator's token file (the node imports while the coordinator starts)."""
    if path is None:
        return
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if time.monotonic() > deadline:
            raise SystemExit(f"no token in {path} within {timeout:.0f} s")
        time.sleep(0.05)
    os.environ["DRIFT_TOKEN"] = path.read_text().strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="node")
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--previous", type=Path, default=None)
    ap.add_argument("--token-file", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(sum(args.name.encode()))  # unlike inits: round 0 must unify them
    program = RECIPES[args.recipe].build(Context(args.out, args.name, args.stage, args.previous))
    recorder = Recorder(args.out)
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(args.out),
        **program.trainer,
    }
    options["callbacks"] = [recorder, *options.get("callbacks", []), *program.callbacks]
    token(args.token_file)
    strategy = DriftStrategy(name=args.name, calibration_seconds=0.05, progress_every=0.5)
    trainer = L.Trainer(strategy=strategy, **options)
    model = program.module
    if isinstance(program.data, L.LightningDataModule):
        trainer.fit(model, datamodule=program.data, **program.fit)
    else:
        train, val = program.data
        trainer.fit(model, train_dataloaders=train, val_dataloaders=val, **program.fit)
    final = tensors(model)
    save_file(final, str(args.out / "final.safetensors"))
    report = {
        "history": msgspec.to_builtins(strategy.history),
        "node_key": strategy.node_key,
        "current_epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "finished": strategy.finished,
        "lr": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
        "validations": recorder.validations,
        "epochs": recorder.epochs,
        "counts": getattr(model, "counts", {}),
        "final_sha256": digest(final),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
