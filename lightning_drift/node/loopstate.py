"""Every touch of Lightning's private loop state, in one place, checked against the installed
Lightning.

A drift node follows the session, not its own plan: a re-plan changes the running epoch's
length, a rejoin jumps to the session's epoch, and a session's stop ends the fit. Lightning
offers no public way to do these, so this module edits its loop state directly. The names it
touches are listed in :data:`PRIVATE` and checked at first use (:func:`check`) for the
Lightning versions ``pyproject.toml`` allows (``lightning>=2.4,<3``): a Lightning that moved
one fails with a message naming its version, instead of a node that silently trains the wrong
length. The boundary is the Lightning version: when Lightning changes, only this module (and
its test) change.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import lightning
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, Sampler

from lightning_drift.errors import ConfigError
from lightning_drift.node.barriers import steps_per_epoch

SUPPORTED = "lightning>=2.4,<3"
# Where each private (or undocumented) name lives; ``trainer`` is a ``Trainer``, ``fetcher``
# the fit loop's data fetcher, ``progress`` the fit loop's epoch counters.
PRIVATE: dict[str, tuple[str, ...]] = {
    "fit_loop": ("_data_fetcher", "max_batches", "epoch_progress", "_last_train_dl_reload_epoch"),
    "fetcher": ("length", "done", "fetched"),
    "progress": ("ready", "started", "processed", "completed"),
    "trainer": ("val_check_batch",),
}
# Absent in some supported versions, where its absence means "off": a time-based
# val_check_interval (Lightning 2.6).
OPTIONAL: dict[str, tuple[str, ...]] = {"trainer": ("_val_check_time_interval",)}
_checked = False
# The integer ``val_check_interval`` each trainer was given, before :func:`fit_val_interval`
# fitted it to an epoch's shard.
_asked_interval: WeakKeyDictionary[Any, Any] = WeakKeyDictionary()


def missing(trainer: Any) -> list[str]:
    """The names of :data:`PRIVATE` this Lightning lacks (``where.name``)."""
    from lightning.pytorch.loops.fetchers import _DataFetcher

    owners = {
        "fit_loop": trainer.fit_loop,
        "fetcher": _DataFetcher(),
        "progress": trainer.fit_loop.epoch_progress.current,
        "trainer": trainer,
    }
    return [
        f"{where}.{name}"
        for where, names in PRIVATE.items()
        for name in names
        if not hasattr(owners[where], name)
    ]


def check(trainer: Any) -> None:
    """Fail with a clear message when this Lightning lacks a name the node edits. Once."""
    global _checked
    if _checked:
        return
    gone = missing(trainer)
    if gone:
        raise ConfigError(
            f"lightning_drift supports {SUPPORTED}; the installed Lightning "
            f"{lightning.__version__} lacks {', '.join(gone)}, which a node edits to follow "
            "the session's plan. Install a supported Lightning."
        )
    _checked = True


def reset_check() -> None:
    """Forget that :func:`check` passed, so the next call checks again (after the installed
    Lightning, or :data:`PRIVATE`, changed: a test's stand-in for another version)."""
    global _checked
    _checked = False


def with_sampler(dataloader: DataLoader, sampler: Sampler[int]) -> DataLoader:
    """``dataloader`` over the same dataset, drawing from ``sampler`` (batch size, collate_fn,
    workers, pin_memory and drop_last kept), as Lightning rebuilds training loaders."""
    return _update_dataloader(dataloader, sampler, mode=RunningStage.TRAINING)


def reload_train_data(trainer: Any) -> None:
    """Make the fit loop load its train dataloader again when it starts.

    A hook that runs inside ``Trainer.setup`` (``configure_optimizers`` asking for
    ``trainer.estimated_stepping_batches``) loads the train dataloader before the fit starts;
    the fit loop then keeps that loader for its first epoch and the node would train it
    outside the session. Forgetting when it was loaded makes the fit's own first epoch load
    it again, through the strategy, which joins and shards it."""
    trainer.fit_loop._last_train_dl_reload_epoch = float("-inf")


def limited(trainer: Any, batches: int) -> int:
    """``batches`` as ``Trainer(limit_train_batches)`` cuts an epoch of them."""
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        return min(batches, limit)
    if isinstance(limit, float) and limit < 1.0:
        return int(batches * limit)
    return batches


def follow_epoch_length(trainer: Any, batches: int) -> None:
    """Make Lightning's running epoch ``batches`` long (the sampler's work was re-planned).

    Lightning reads an epoch's length once, at its start: a sampler that yields more is cut
    off at the old length, and one that yields fewer ends the epoch without its end-of-epoch
    validation. So the fit loop's length, the data fetcher's and the batch that triggers
    validation are all set to the new one (a ``limit_train_batches`` still caps it)."""
    batches = limited(trainer, batches)
    loop = trainer.fit_loop
    loop.max_batches = batches
    fetcher = loop._data_fetcher
    if fetcher is not None and fetcher.length is not None:
        fetcher.length = batches
        fetcher.done = fetcher.fetched >= batches
    interval = trainer.val_check_interval
    if getattr(trainer, "_val_check_time_interval", None) is None and isinstance(interval, float):
        trainer.val_check_batch = max(1, int(batches * interval))
    fit_val_interval(trainer, batches)


def fit_val_interval(trainer: Any, batches: int) -> None:
    """An integer ``val_check_interval`` (validate every N batches of an epoch) fitted to an
    epoch of ``batches``: at most the epoch's length.

    The session sizes each node's share of an epoch by its pace, so a share can be shorter
    than the interval the program asked for, and Lightning refuses an epoch shorter than its
    interval (``fit_loop.setup_data`` raises). Such an epoch validates once, at its end; a
    longer one every N batches, as asked. Intervals counted across epochs
    (``check_val_every_n_epoch=None``), fractions and times are left as they are."""
    asked = _asked_interval.setdefault(trainer, trainer.val_check_interval)
    if not isinstance(asked, int) or isinstance(asked, bool):
        return
    if trainer.check_val_every_n_epoch is None:
        return
    fitted = max(1, min(asked, batches))
    trainer.val_check_interval = fitted
    trainer.val_check_batch = fitted


def jump_to_epoch(trainer: Any, epoch: int) -> int:
    """Make the fit loop continue at ``epoch`` (a node rejoining a session that moved on);
    returns the epoch it was at."""
    progress = trainer.fit_loop.epoch_progress.current
    was = int(progress.completed)
    progress.ready = progress.started = progress.processed = progress.completed = epoch
    return was


def keep_fitting(trainer: Any, epochs: int) -> int | None:
    """The session trains ``epochs`` epochs: Lightning's ``max_epochs`` follows it, and
    Lightning must not end the fit on a callback's ``should_stop`` by itself (the session
    decides; :func:`end_fit` lets it). Returns the ``max_epochs`` it overrode, if another."""
    loop = trainer.fit_loop
    before = loop.max_epochs
    loop.max_epochs = epochs
    loop.min_epochs = max(loop.min_epochs or 0, epochs)
    return before if before != epochs else None


def end_fit(trainer: Any) -> None:
    """The session is over for this node: let Lightning end the fit after this batch."""
    trainer.should_stop = True
    trainer.fit_loop.min_epochs = 0
    trainer.fit_loop.epoch_loop.min_steps = None


class TrainerLoop:
    """A ``Trainer``'s fit loop as the node's parts see it
    (:class:`~lightning_drift.node.epochwork.Loop`): the functions above, and the few public
    things they read, bound to one trainer and its module."""

    def __init__(self, trainer: Any, module: Any) -> None:
        self.trainer, self.module = trainer, module

    @property
    def epoch(self) -> int:
        return int(self.trainer.current_epoch)

    def more_epochs(self) -> bool:
        return bool(self.trainer.current_epoch + 1 < (self.trainer.max_epochs or 0))

    def steps_per_epoch(self, shard_size: int) -> int:
        trainer = self.trainer
        return steps_per_epoch(
            trainer.num_training_batches,
            shard_size=shard_size,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            automatic=self.module.automatic_optimization,
        )

    def jump_to_epoch(self, epoch: int) -> int:
        return jump_to_epoch(self.trainer, epoch)

    def follow_epoch_length(self, batches: int) -> None:
        follow_epoch_length(self.trainer, batches)

    def keep_fitting(self, epochs: int) -> int | None:
        return keep_fitting(self.trainer, epochs)

    def end_fit(self) -> None:
        end_fit(self.trainer)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)


__all__ = [
    "OPTIONAL",
    "PRIVATE",
    "SUPPORTED",
    "TrainerLoop",
    "check",
    "end_fit",
    "fit_val_interval",
    "follow_epoch_length",
    "jump_to_epoch",
    "keep_fitting",
    "limited",
    "missing",
    "reload_train_data",
    "reset_check",
    "with_sampler",
]
