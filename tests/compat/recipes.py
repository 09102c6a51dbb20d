"""The recipes: Lightning programs from Lightning's documentation, one row each.

A recipe is a function that builds what a user's script would: the ``LightningModule``, its
data, the ``Trainer``'s arguments and callbacks. ``@recipe(...)`` puts it in :data:`RECIPES`
with what the session must end with:

- by default, every node holds exactly the coordinator's final checkpoint (each tensor
  ``torch.equal``) and the coordinator exits 0; ``compare="trained"`` compares the weights
  the fit trained, taken at ``on_train_end`` before a callback such as SWA swaps its own
  average in; a node named in ``leaves`` left the session before its end and holds exactly
  the checkpoint of the last round it took part in;
- ``refused=(...)``: every node fails within seconds, its log holding one of these strings
  (the message that names the fix);
- ``check``: more assertions on the :class:`Outcome` (reports, files, the session's state).

``node.py --recipe NAME`` runs one; ``tests/test_compat.py`` runs the table. A new recipe
is a few lines: a builder, and its row in ``docs/strategy.md``'s "Works with" table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    Callback,
    EarlyStopping,
    EMAWeightAveraging,
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelPruning,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import grad_norm
from lightning_drift_examples.mock_train import make_regression
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

SAMPLES = 64  # the session's dataset: 4 batches of 8 per node and epoch, with two nodes
BATCH = 8
LR = 0.05


@dataclass(frozen=True)
class Context:
    """What a builder is told: the node's folder and name, and for a recipe of several
    sessions, which one this is and the node's folder of the session before."""

    out: Path
    name: str
    stage: int = 0
    previous: Path | None = None


@dataclass
class Program:
    """What a user's script hands Lightning. ``data`` is a datamodule or (train, val) loaders."""

    module: L.LightningModule
    data: L.LightningDataModule | tuple[DataLoader, DataLoader | None]
    trainer: dict[str, Any] = field(default_factory=dict)
    callbacks: list[Callback] = field(default_factory=list)
    fit: dict[str, Any] = field(default_factory=dict)  # more trainer.fit arguments


@dataclass
class Outcome:
    """What a session left behind, for a recipe's ``check``."""

    dirs: dict[str, Path]
    reports: dict[str, dict]
    final_round: int
    final: dict[str, torch.Tensor]
    state: dict


@dataclass(frozen=True)
class Recipe:
    name: str
    build: Callable[[Context], Program]
    coordinator: dict[str, object] = field(default_factory=dict)
    refused: tuple[str, ...] = ()
    compare: Literal["final", "trained"] = "final"
    check: Callable[[Outcome], None] | None = None
    leaves: tuple[str, ...] = ()  # nodes that leave before the session ends (max_steps)
    stages: int = 1  # sessions run one after the other (resume a previous session's file)


RECIPES: dict[str, Recipe] = {}


def recipe(name: str | None = None, **row: Any) -> Callable[[Callable], Callable]:
    def add(build: Callable[[Context], Program]) -> Callable[[Context], Program]:
        key = name or build.__name__
        assert key not in RECIPES, key
        RECIPES[key] = Recipe(key, build, **row)
        return build

    return add


# -- the data and the models ----------------------------------------------------------------------


def loaders(
    train: Dataset | None = None, val: Dataset | None = None
) -> tuple[DataLoader, DataLoader]:
    """The training set shuffled in batches of 8 (drift replaces the sampler), validation as is."""
    train = train if train is not None else make_regression(SAMPLES, 8, seed=0, split=0)
    val = val if val is not None else make_regression(32, 8, seed=0, split=1)
    return DataLoader(train, batch_size=BATCH, shuffle=True), DataLoader(val, batch_size=16)


class Net(L.LightningModule):
    """A regression MLP of 161 parameters (8 -> 16 -> 1), BatchNorm on request."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(8, 16)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(16))
        self.net = nn.Sequential(*layers, nn.ReLU(), nn.Linear(16, 1))
        self.counts: dict[str, int] = {}  # hooks a recipe counts, reported by the node

    def count(self, hook: str) -> None:
        self.counts[hook] = self.counts.get(hook, 0) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x.to(self.dtype)).float(), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=LR)


def plain(module: L.LightningModule | None = None, **trainer: Any) -> Program:
    return Program(module or Net(), loaders(), trainer=trainer)


# -- the plain program, and its data as a LightningDataModule --------------------------------------


@recipe()
def loaders_fit(ctx: Context) -> Program:
    """``trainer.fit(model, train_dataloaders=..., val_dataloaders=...)``."""
    return plain()


class RegressionData(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.train_loader, self.val_loader = loaders()

    def train_dataloader(self) -> DataLoader:
        return self.train_loader

    def val_dataloader(self) -> DataLoader:
        return self.val_loader


@recipe()
def datamodule(ctx: Context) -> Program:
    return Program(Net(), RegressionData())


# -- learning-rate schedulers --------------------------------------------------------------------


def lr_is(expected: Callable[[dict], float]) -> Callable[[Outcome], None]:
    """A check: the first optimizer's learning rate at the fit's end is ``expected(report)``."""

    def check(o: Outcome) -> None:
        for name, r in o.reports.items():
            assert math.isclose(r["lr"], expected(r), rel_tol=1e-9), (name, r["lr"], expected(r))

    return check


class StepPerEpoch(Net):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


@recipe(check=lr_is(lambda r: LR * 0.5 ** r["current_epoch"]))
def steplr_epoch(ctx: Context) -> Program:
    return plain(StepPerEpoch())


class StepPerStep(Net):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@recipe(check=lr_is(lambda r: LR * 0.5 ** (r["global_step"] // 2)))
def steplr_step(ctx: Context) -> Program:
    return plain(StepPerStep())


class OneCycle(Net):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        # A peak of 0.02: at 0.1 a node whose share held the cycle's peak steps diverged.
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.02, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@recipe()
def onecycle_estimated_steps(ctx: Context) -> Program:
    """Lightning's documented OneCycleLR: ``total_steps=trainer.estimated_stepping_batches``."""
    return plain(OneCycle())


@recipe()
def onecycle_with_accumulation(ctx: Context) -> Program:
    """The same, with ``accumulate_grad_batches=2``: the estimate counts optimizer steps."""
    return plain(OneCycle(), accumulate_grad_batches=2)


@recipe(refused=("set Trainer(max_epochs=2)",))
def onecycle_sized_for_fewer_epochs(ctx: Context) -> Program:
    """``Trainer(max_epochs=1)`` in a session of two epochs: the schedule, sized by the
    estimate, would run out in the second, so the node refuses at the join."""
    return plain(OneCycle(), max_epochs=1)


class WarmRestarts(Net):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@recipe()
def cosine_warm_restarts(ctx: Context) -> Program:
    return plain(WarmRestarts())


class Plateau(Net):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}


@recipe()
def reduce_on_plateau(ctx: Context) -> Program:
    return plain(Plateau())


def csv_logger(ctx: Context) -> CSVLogger:
    return CSVLogger(save_dir=str(ctx.out), name="logs", version=0)


def metrics_hold(*columns: str) -> Callable[[Outcome], None]:
    """A check: each node's CSVLogger wrote a value for each of ``columns``."""

    def check(o: Outcome) -> None:
        for name, folder in o.dirs.items():
            text = (folder / "logs" / "version_0" / "metrics.csv").read_text()
            header, *rows = text.splitlines()
            for column in columns:
                assert column in header.split(","), (name, header)
            assert rows, name

    return check


@recipe(check=metrics_hold("lr-SGD"))
def lr_monitor(ctx: Context) -> Program:
    return plain(
        StepPerStep(),
        logger=csv_logger(ctx),
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step")],
    )


# -- manual optimization ---------------------------------------------------------------------------


class Manual(Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.loss(batch)
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss)


@recipe()
def manual_one_optimizer(ctx: Context) -> Program:
    return plain(Manual())


class Gan(L.LightningModule):
    """Lightning's GAN recipe in small: the generator's step, then the discriminator's,
    each between ``toggle_optimizer`` and ``untoggle_optimizer``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Linear(4, 8)
        self.discriminator = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), 4)
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)

        self.toggle_optimizer(opt_g)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self.generator(z)), ones)
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)

        self.toggle_optimizer(opt_d)
        fake = self.generator(z).detach()
        d_loss = (
            F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
            + F.binary_cross_entropy_with_logits(self.discriminator(fake), zeros)
        ) / 2
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.Adam(self.discriminator.parameters(), lr=1e-3),
        ]


@recipe()
def manual_two_optimizers(ctx: Context) -> Program:
    train, _ = loaders()
    return Program(Gan(), (train, None), trainer={"limit_val_batches": 0})


def sequences(n: int, seed: int) -> TensorDataset:
    """``n`` sequences of 8 steps of 2 features; the target is the running sum of the first."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, 2, generator=gen)
    return TensorDataset(x, x[..., :1].cumsum(1) / 4)


class Tbptt(L.LightningModule):
    """Lightning 2's truncated backpropagation through time: the sequence is split inside
    ``training_step`` and the optimizer steps once per chunk."""

    def __init__(self, chunk: int = 4) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.chunk = chunk
        self.rnn = nn.RNN(2, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> Any:
        out, hidden = self.rnn(x, hidden)
        return self.head(out), hidden

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        hidden = None
        for xs, ys in zip(x.split(self.chunk, 1), y.split(self.chunk, 1), strict=True):
            pred, hidden = self(xs, hidden)
            loss = F.mse_loss(pred, ys)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            hidden = hidden.detach()
            self.log("train_loss", loss)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=LR)


@recipe()
def manual_tbptt_steps_per_batch(ctx: Context) -> Program:
    train = DataLoader(sequences(SAMPLES, 0), batch_size=BATCH, shuffle=True)
    return Program(Tbptt(), (train, None), trainer={"limit_val_batches": 0})


# -- gradients -----------------------------------------------------------------------------------


@recipe()
def clip_grad_norm(ctx: Context) -> Program:
    return plain(gradient_clip_val=0.5, gradient_clip_algorithm="norm")


@recipe()
def clip_grad_value(ctx: Context) -> Program:
    return plain(gradient_clip_val=0.1, gradient_clip_algorithm="value")


class OwnClipping(Net):
    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        self.count("configure_gradient_clipping")
        self.clip_gradients(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")


def counted(hook: str) -> Callable[[Outcome], None]:
    """A check: the module's ``hook`` ran once per optimizer step of the fit."""

    def check(o: Outcome) -> None:
        for name, r in o.reports.items():
            assert r["counts"].get(hook) == r["global_step"] > 0, (
                name,
                r["counts"],
                r["global_step"],
            )

    return check


@recipe(check=counted("configure_gradient_clipping"))
def configure_gradient_clipping(ctx: Context) -> Program:
    return plain(OwnClipping())


class GradNorms(Net):
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.count("on_before_optimizer_step")
        self.log_dict(grad_norm(self, norm_type=2))


@recipe(check=counted("on_before_optimizer_step"))
def on_before_optimizer_step(ctx: Context) -> Program:
    return plain(GradNorms())


@recipe()
def accumulate_grad_batches(ctx: Context) -> Program:
    return plain(accumulate_grad_batches=2)


@recipe()
def accumulation_scheduler(ctx: Context) -> Program:
    """``GradientAccumulationScheduler``: 1 batch per step in epoch 0, 2 from epoch 1."""
    return plain(callbacks=[GradientAccumulationScheduler(scheduling={0: 1, 1: 2})])


# -- callbacks that change the weights or the model ----------------------------------------------


def pruning(ctx: Context) -> Program:
    return plain(callbacks=[ModelPruning("l1_unstructured", amount=0.5)])


# Pruning re-parametrizes the weights (``weight`` -> ``weight_orig`` and a ``weight_mask``
# buffer) at the first epoch's end: the tensor table changes mid-fit, whatever crosses the wire.
for dtype in ("float32", "int8"):
    recipe(
        f"model_pruning_{dtype}",
        coordinator={"transfer_dtype": dtype},
        refused=("weight_orig", "weight_mask"),
    )(pruning)


def averages_agree(o: Outcome) -> None:
    """A check: the average every node swapped in at the fit's end is the same on all."""
    (first, a), *rest = o.reports.items()
    for name, r in rest:
        assert r["final_sha256"] == a["final_sha256"], (first, name)


@recipe(compare="trained", check=averages_agree)
def stochastic_weight_averaging(ctx: Context) -> Program:
    return plain(callbacks=[StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)])


@recipe(compare="trained")
def ema_weight_averaging(ctx: Context) -> Program:
    """Lightning's ``EMAWeightAveraging``: an average of the node's own steps, swapped in at
    the fit's end (the session's weights are what the fit trained)."""
    return plain(callbacks=[EMAWeightAveraging(decay=0.9)])


class Backbone(Net):
    """``BackboneFinetuning`` wants a ``backbone`` and the optimizer on trainable parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.net = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.backbone(x)).squeeze(-1)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


@recipe()
def backbone_finetuning(ctx: Context) -> Program:
    return plain(Backbone(), callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)])


# -- checkpoints, validation, stopping -------------------------------------------------------------


def checkpoints(ctx: Context) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=str(ctx.out / "ckpt"), every_n_epochs=1, save_top_k=-1, save_last=True
    )


def last_ckpt_holds_the_final(o: Outcome) -> None:
    """A check: each node's last.ckpt records the final round, with its weights exactly, and
    the epoch's checkpoints record a round each."""
    for name, folder in o.dirs.items():
        last = torch.load(folder / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
        assert last["drift"]["round"] == o.final_round, (name, last["drift"])
        assert last["drift"]["samples_since_round"] == 0, (name, last["drift"])
        for k, ref in o.final.items():
            assert torch.equal(last["state_dict"][k], ref), (name, k)
        epochs = sorted(folder.glob("ckpt/epoch=*.ckpt"))
        assert len(epochs) == 2, (name, epochs)
        for path in epochs:
            entry = torch.load(path, map_location="cpu", weights_only=False)["drift"]
            assert entry["samples_since_round"] == 0, (path.name, entry)


@recipe(check=last_ckpt_holds_the_final)
def model_checkpoint(ctx: Context) -> Program:
    return plain(enable_checkpointing=True, callbacks=[checkpoints(ctx)])


def validations(check: Callable[[int], bool]) -> Callable[[Outcome], None]:
    def run(o: Outcome) -> None:
        for name, r in o.reports.items():
            assert check(r["validations"]), (name, r["validations"])

    return run


def validated_per_epoch(least: Callable[[int], int]) -> Callable[[Outcome], None]:
    """A check: every epoch a node trained ``b`` batches of validated at least ``least(b)``
    times. A node's share of an epoch follows its measured pace, so ``b`` differs between
    nodes and runs; the check counts what each epoch was."""

    def run(o: Outcome) -> None:
        for name, r in o.reports.items():
            trained = {e: t for e, t in r["epochs"].items() if t["batches"]}
            assert trained, (name, r["epochs"])
            for epoch, t in trained.items():
                assert t["validations"] >= least(t["batches"]), (name, epoch, r["epochs"])

    return run


# An epoch's share is fixed at its start (no re-plan moves work within it), so the number of
# validations Lightning runs in it follows from its length alone.
FIXED_SHARES = {"rebalance": False}


@recipe(coordinator=FIXED_SHARES, check=validated_per_epoch(lambda b: min(2, b)))
def val_check_interval(ctx: Context) -> Program:
    """Validation twice an epoch (``val_check_interval=0.5``): twice in each node's share of
    an epoch, once where the share is a single batch."""
    return plain(val_check_interval=0.5)


@recipe(coordinator=FIXED_SHARES, check=validated_per_epoch(lambda b: max(1, b // 2)))
def val_check_interval_steps(ctx: Context) -> Program:
    """Validation every 2 training batches (an integer ``val_check_interval``); a share of
    one batch validates at its end."""
    return plain(val_check_interval=2)


@recipe(coordinator=FIXED_SHARES, check=validated_per_epoch(lambda b: 1))
def val_check_interval_longer_than_a_share(ctx: Context) -> Program:
    """An integer ``val_check_interval`` longer than a node's share of an epoch (5 batches;
    the shares are 4 at equal paces): Lightning refuses an epoch shorter than its interval,
    so a node validates such a share once, at its end."""
    return plain(val_check_interval=5)


@recipe(check=validations(lambda n: n == 1))
def check_val_every_n_epoch(ctx: Context) -> Program:
    return plain(check_val_every_n_epoch=2)


def session_stopped(reason: str) -> Callable[[Outcome], None]:
    def check(o: Outcome) -> None:
        stop = o.state.get("stop")
        assert o.state["finished"] and stop and stop["round"] == o.final_round, o.state
        assert reason in stop["reason"], stop

    return check


@recipe(coordinator={"epochs": 3}, check=session_stopped(""))
def early_stopping(ctx: Context) -> Program:
    """``EarlyStopping`` that fires after the first epoch of three."""
    return plain(callbacks=[EarlyStopping(monitor="val_loss", stopping_threshold=1e6)])


def left_at_max_steps(o: Outcome) -> None:
    """Node a left at its max_steps, before it had delivered any work, so its request could
    not stop the session under the default policy; b trained every epoch to the session's end,
    which no stop decided."""
    a, b = o.reports["a"], o.reports["b"]
    assert a["global_step"] == 1 and a["finished"] and not a["history"][-1]["finished"], a
    assert a["history"][-1]["round"] == 1 and a["history"][-1]["contributed"], a["history"]
    assert o.state["finished"] and o.state["stop"].get("round") is None, o.state["stop"]
    members = {m["name"]: m for m in o.state["roster"]["members"].values()}
    assert members["a"]["state"] == "left", members["a"]
    assert "reached Trainer(max_steps=1)" in members["a"]["reason"], members["a"]
    assert b["history"][-1]["finished"] and b["history"][-1]["epoch"] == 1, b["history"]


@recipe(coordinator={"keep": 100}, leaves=("a",), check=left_at_max_steps)
def max_steps(ctx: Context) -> Program:
    """``Trainer(max_steps=1)`` on node a only, under the default stop policy: a leaves the
    session at its first step (its step counts, the rest of its work is handed on) and its fit
    ends; b trains the session to its end."""
    return plain(max_steps=1) if ctx.name == "a" else plain()


@recipe()
def limit_train_batches(ctx: Context) -> Program:
    return plain(limit_train_batches=2)


@recipe(coordinator={"stop_policy": "first"}, check=session_stopped("max_steps"))
def fast_dev_run(ctx: Context) -> Program:
    """``Trainer(fast_dev_run=True)``: one batch, then the fit ends (it is ``max_steps=1``);
    under ``--stop-policy first`` the session follows the node and ends with it."""
    return plain(fast_dev_run=True)


@recipe()
def max_time(ctx: Context) -> Program:
    """``Trainer(max_time=...)``: a ``Timer`` that asks to stop once the time is up."""
    return plain(max_time={"seconds": 1})


class SyncDistLogging(Net):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch), sync_dist=True)


@recipe(check=metrics_hold("train_loss_step", "train_loss_epoch", "val_loss"))
def log_sync_dist(ctx: Context) -> Program:
    return plain(SyncDistLogging(), logger=csv_logger(ctx), log_every_n_steps=1)


def trained_in_the_new_session(o: Outcome) -> None:
    """A check: the resumed nodes trained the new session's epochs."""
    for name, r in o.reports.items():
        epochs = {h["epoch"] for h in r["history"] if h["samples"]}
        assert epochs == {0, 1}, (name, r["history"])


@recipe(stages=2, check=trained_in_the_new_session)
def resume_previous_session(ctx: Context) -> Program:
    """A first session saves last.ckpt; a new session's nodes fit from it."""
    program = plain(enable_checkpointing=True, callbacks=[checkpoints(ctx)])
    if ctx.previous is not None:
        program.fit["ckpt_path"] = str(ctx.previous / "ckpt" / "last.ckpt")
    return program


# -- precision -----------------------------------------------------------------------------------

# "16-mixed" on a CPU is not a recipe of its own: Lightning turns it into "bf16-mixed".
for precision in ("bf16-mixed", "bf16-true", "16-true", "64-true"):
    recipe(f"precision_{precision.replace('-', '_')}")(
        lambda ctx, precision=precision: plain(precision=precision)
    )


# torch.compile is not a row: on a CPU, inductor compiles even this model for 15 s per process.


# -- models with something special in their state dict ---------------------------------------------


def tokens(n: int, seed: int) -> TensorDataset:
    """``n`` sequences of 5 tokens of 16; the task: predict each next token."""
    t = torch.randint(0, 16, (n, 5), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(t[:, :-1], t[:, 1:])


class TiedLM(L.LightningModule):
    """An embedding and an output layer sharing one Parameter (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 16, bias=False)
        self.out.weight = self.embed.weight

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hidden(h))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.out(self.mix(self.embed(x)))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def still_tied(o: Outcome) -> None:
    for name, r in o.reports.items():
        assert r["counts"] == {"tied": 1}, (name, r["counts"])


class TiedReport(Callback):
    """Whether the two layers still share one Parameter after the fit."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.counts = {"tied": int(pl_module.out.weight is pl_module.embed.weight)}


@recipe(check=still_tied)
def tied_weights(ctx: Context) -> Program:
    train = DataLoader(tokens(SAMPLES, 0), batch_size=BATCH, shuffle=True)
    return Program(
        TiedLM(), (train, None), callbacks=[TiedReport()], trainer={"limit_val_batches": 0}
    )


class CausalAttention(TiedLM):
    """One attention layer whose causal mask is a buffer: 0 on and below the diagonal,
    ``-inf`` above, added to the scores (non-finite by design, and never trained)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(8) + self.mask
        return self.hidden(scores.softmax(-1) @ v)


def mask_untouched(o: Outcome) -> None:
    mask = o.final["mask"]
    assert torch.equal(mask, torch.full((4, 4), float("-inf")).triu(1)), mask


@recipe(check=mask_untouched)
def non_finite_buffer(ctx: Context) -> Program:
    train = DataLoader(tokens(SAMPLES, 0), batch_size=BATCH, shuffle=True)
    return Program(CausalAttention(), (train, None), trainer={"limit_val_batches": 0})


@recipe()
def batchnorm(ctx: Context) -> Program:
    return plain(Net(batchnorm=True))
