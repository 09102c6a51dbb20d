"""Every private name of Lightning the node edits exists on the installed Lightning."""

from __future__ import annotations

import lightning as L
import pytest
from packaging.version import Version

from lightning_drift.errors import ConfigError
from lightning_drift.node import loopstate


def test_the_installed_lightning_is_one_pyproject_allows():
    assert Version("2.4") <= Version(L.__version__) < Version("3")


def test_every_private_name_the_node_touches_exists_on_the_installed_lightning():
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    assert loopstate.missing(trainer) == []
    loopstate.check(trainer)


def test_a_lightning_without_them_fails_naming_its_version(monkeypatch):
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    loopstate.reset_check()
    monkeypatch.setitem(loopstate.PRIVATE, "fit_loop", ("_data_fetcher", "_gone_in_this_one"))
    with pytest.raises(ConfigError, match=f"Lightning {L.__version__} lacks fit_loop._gone"):
        loopstate.check(trainer)


def test_jump_to_epoch_moves_every_epoch_counter():
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    assert loopstate.jump_to_epoch(trainer, 3) == 0
    assert trainer.current_epoch == 3


def trainer_with(**options) -> L.Trainer:
    return L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, **options)


def test_an_integer_val_check_interval_is_fitted_to_each_epochs_share():
    trainer = trainer_with(val_check_interval=5)
    loopstate.fit_val_interval(trainer, 3)  # a share shorter than the interval: once, at its end
    assert (trainer.val_check_interval, trainer.val_check_batch) == (3, 3)
    loopstate.fit_val_interval(trainer, 12)  # a longer one: every 5 batches, as asked
    assert (trainer.val_check_interval, trainer.val_check_batch) == (5, 5)
    loopstate.fit_val_interval(trainer, 0)  # an empty share trains nothing: never below 1
    assert trainer.val_check_batch == 1


@pytest.mark.parametrize(
    "options",
    [{"val_check_interval": 0.5}, {"val_check_interval": 5, "check_val_every_n_epoch": None}],
)
def test_fractions_and_intervals_across_epochs_are_left_as_asked(options):
    trainer = trainer_with(**options)
    loopstate.fit_val_interval(trainer, 2)
    assert trainer.val_check_interval == options["val_check_interval"]
