"""The example models: the char-LM data is deterministic and the models learn, on a CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning_drift_examples.charlm import (
    VOCAB_SIZE,
    ByteWindows,
    CharDataModule,
    CharLM,
    load_text,
    stdlib_files,
)
from lightning_drift_examples.mock_train import MockData, MockModel
from lightning_drift_examples.mock_train import main as mock_main

from lightning_drift.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def plain_trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


# ----------------------------------------------------------------------------- charlm data


def test_text_is_the_sorted_stdlib_cut_at_max_chars():
    first = stdlib_files()[0]
    assert [p.name for p in stdlib_files()] == sorted(p.name for p in stdlib_files())
    assert load_text(1000) == first.read_bytes()[:1000]
    assert len(load_text(200_000)) == 200_000


def test_too_small_a_stdlib_is_an_error_not_a_smaller_dataset():
    with pytest.raises(ValueError, match="fewer than max_chars"):
        load_text(10**10)


def test_datamodule_is_deterministic_at_the_tiny_settings():
    a, b = CharDataModule(), CharDataModule()
    a.setup("fit")
    b.setup("fit")
    # Sizes depend on max_chars, block_size and stride only: the same on every machine.
    assert (len(a.train_dataset), len(a.val_dataset)) == (2812, 312)
    assert (len(b.train_dataset), len(b.val_dataset)) == (2812, 312)
    for i in (0, 1, len(a.train_dataset) - 1):
        assert torch.equal(torch.cat(a.train_dataset[i]), torch.cat(b.train_dataset[i]))
    assert torch.equal(torch.cat(a.val_dataset[0]), torch.cat(b.val_dataset[0]))
    assert a.vocab_size == VOCAB_SIZE == 256


def test_byte_windows_shift_by_one_and_count_exactly():
    data = torch.arange(100, dtype=torch.uint8)
    ds = ByteWindows(data, block_size=8, stride=5)
    assert len(ds) == (100 - 9) // 5 + 1
    x, y = ds[3]
    assert x.dtype == torch.long and torch.equal(x, torch.arange(15, 23))
    assert torch.equal(y, torch.arange(16, 24))
    ds[len(ds) - 1]  # the last window fits
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert len(ByteWindows(data[:8], block_size=8, stride=1)) == 0


def test_datamodule_reads_a_given_file(tmp_path):
    (tmp_path / "corpus.txt").write_bytes(b"abcdefghi\n" * 100)
    dm = CharDataModule(max_chars=None, block_size=9, batch_size=4, path=str(tmp_path))
    dm.setup("fit")
    assert len(dm.train_dataset) == (900 - 10) // 9 + 1
    assert len(dm.val_dataset) == (100 - 10) // 9 + 1


# ----------------------------------------------------------------------------- charlm model


def test_charlm_tensors_are_not_shared_and_attention_is_causal():
    model = CharLM(d_model=32, n_layers=1, n_heads=2, block_size=16)
    ptrs = [t.data_ptr() for t in model.state_dict().values()]
    assert len(ptrs) == len(set(ptrs))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :10], model(changed)[:, :10], atol=1e-6)
        assert model(x).shape == (2, 16, 256)
    with pytest.raises(ValueError, match="must divide"):
        CharLM(d_model=30, n_heads=4)


@pytest.mark.timeout(120)
def test_charlm_learns_in_a_plain_trainer_on_cpu():
    L.seed_everything(0, verbose=False)
    data = CharDataModule(max_chars=100_000, block_size=32, batch_size=16)
    model = CharLM(d_model=64, n_layers=2, n_heads=4, block_size=32, lr=3e-3)
    trainer = plain_trainer(max_steps=40, limit_val_batches=8)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
    trainer.fit(model, datamodule=data)
    assert "train_loss" in trainer.callback_metrics
    after = trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
    # ln(256) = 5.55 for a uniform guess; 40 steps reach below 3.5 (about 2.9 measured).
    assert before > 5.0
    assert after < before - 1.5, (before, after)


# ----------------------------------------------------------------------------- mock_train


def test_mock_data_is_fixed_and_the_mock_model_learns():
    a, b = MockData(), MockData()
    assert len(a.train_dataset) == 256 and len(a.val_dataset) == 64
    assert torch.equal(a.train_dataset.tensors[0], b.train_dataset.tensors[0])
    assert not torch.equal(a.train_dataset.tensors[0][:64], a.val_dataset.tensors[0])
    L.seed_everything(0, verbose=False)
    model = MockModel()
    trainer = plain_trainer(max_epochs=3)
    before = trainer.validate(model, datamodule=a, verbose=False)[0]["val_loss"]
    trainer.fit(model, datamodule=a)
    after = trainer.validate(model, datamodule=a, verbose=False)[0]["val_loss"]
    assert after < 0.1 * before, (before, after)


def test_mock_train_without_a_token_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv("DRIFT_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="DRIFT_TOKEN"):
        mock_main(["--epochs", "1"])


@pytest.mark.timeout(120)
def test_mock_train_runs_as_a_script():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mock_train.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stderr
    assert "--token" in out.stdout and "--epochs" in out.stdout


# ----------------------------------------------------------------------------- train.yaml


def test_train_yaml_builds_the_drift_trainer_and_charlm(monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from lightning_drift import DriftStrategy

    monkeypatch.setenv("DRIFT_TOKEN", "token-from-the-environment")
    cli = LightningCLI(run=False, args=["--config", str(ROOT / "examples" / "train.yaml")])
    assert isinstance(cli.trainer.strategy, DriftStrategy)
    assert cli.trainer.strategy.token == "token-from-the-environment"
    assert isinstance(cli.model, CharLM) and isinstance(cli.datamodule, CharDataModule)
    assert cli.model.hparams.block_size == cli.datamodule.block_size
    assert cli.trainer.max_epochs == 2
