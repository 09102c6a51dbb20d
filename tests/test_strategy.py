"""DriftStrategy's contract with Lightning that needs no coordinator: construction, registration,
device and dataset checks. Training across processes is tested in test_e2e*.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_drift import ConfigError, DriftStrategy

TOKEN = "eyJ-not-checked-until-the-node-joins"


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.lin(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.randn(8, 2))


def test_without_token_the_error_says_where_to_get_one(monkeypatch):
    monkeypatch.delenv("DRIFT_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="DRIFT_TOKEN"):
        DriftStrategy()


def test_strategy_by_name_takes_the_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("DRIFT_TOKEN", TOKEN)
    trainer = L.Trainer(strategy="drift", accelerator="cpu", logger=False)
    assert isinstance(trainer.strategy, DriftStrategy)
    assert trainer.strategy.token == TOKEN
    assert trainer.strategy.root_device == torch.device("cpu")


def test_more_than_one_device_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="one device per machine.*devices=1"):
        L.Trainer(strategy=DriftStrategy(token=TOKEN), accelerator="cpu", devices=2)


def test_auto_devices_on_a_multi_gpu_machine_train_on_the_first(monkeypatch, caplog):
    # devices="auto" resolves every CUDA device; a node takes one and says so. Fewer than
    # every GPU can only be Trainer(devices=N): that stays an error. (No GPU here: the
    # resolved list is what Lightning's accelerator connector would hand the strategy.)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    s = DriftStrategy(token=TOKEN)
    with caplog.at_level("WARNING", logger="lightning_drift.node.strategy"):
        s.parallel_devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert s.parallel_devices == [torch.device("cuda", 0)]
    assert s.root_device == torch.device("cuda", 0)
    assert "trains on one: cuda:0" in caplog.text and "devices=1" in caplog.text
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match="devices=1"):
        DriftStrategy(token=TOKEN).parallel_devices = [
            torch.device("cuda", 0),
            torch.device("cuda", 1),
        ]


def test_an_explicit_device_wins_over_what_the_trainer_resolved():
    s = DriftStrategy(token=TOKEN, device="cpu")
    s.parallel_devices = [torch.device("cpu")]
    assert s.parallel_devices == [torch.device("cpu")] and s.root_device.type == "cpu"
    trainer = L.Trainer(strategy=DriftStrategy(token=TOKEN, device="cpu"), logger=False)
    assert trainer.strategy.parallel_devices == [torch.device("cpu")]


def test_num_nodes_is_refused():
    with pytest.raises(ConfigError, match="num_nodes"):
        L.Trainer(strategy=DriftStrategy(token=TOKEN), accelerator="cpu", num_nodes=2)


def test_explicit_device_that_does_not_exist_is_refused():
    with pytest.raises(ConfigError, match="available"):
        DriftStrategy(token=TOKEN, device="cuda:7")


def test_bad_mode_is_refused():
    with pytest.raises(ConfigError, match="local.*internet"):
        DriftStrategy(token=TOKEN, mode="lan")


def test_iterable_dataset_is_refused_before_any_network(tmp_path):
    trainer = L.Trainer(
        strategy=DriftStrategy(token=TOKEN),
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    with pytest.raises(ConfigError, match="map-style"):
        trainer.fit(Tiny(), DataLoader(Stream(), batch_size=2))


def test_lightning_cli_builds_the_strategy_from_yaml(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            trainer:
              accelerator: cpu
              logger: false
              strategy:
                class_path: lightning_drift.DriftStrategy
                init_args:
                  token: {TOKEN}
                  connect_timeout: 7.5
                  mode: internet
            """
        )
    )
    cli = LightningCLI(Tiny, run=False, args=["--config", str(cfg)], save_config_callback=None)
    s = cli.trainer.strategy
    assert isinstance(s, DriftStrategy)
    assert (s.token, s.way.connect_timeout, s.way.mode) == (TOKEN, 7.5, "internet")


@pytest.mark.parametrize(
    "imports",
    [
        "import lightning_drift\nfrom lightning.pytorch import Trainer",
        "from lightning.pytorch import Trainer\nimport lightning_drift",
    ],
)
def test_strategy_name_registers_in_either_import_order(imports, tmp_path):
    code = imports + textwrap.dedent(
        f"""
        import os
        os.environ["DRIFT_TOKEN"] = "{TOKEN}"
        t = Trainer(strategy="drift", accelerator="cpu", logger=False)
        print(type(t.strategy).__name__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("DriftStrategy")


def _python(code: str, tmp_path: Path, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_importing_the_package_imports_neither_lightning_nor_torch(tmp_path):
    # The coordinator and the CLI import lightning_drift; Lightning would cost them seconds.
    code = """
        import sys
        import lightning_drift
        print(sorted(m for m in ("lightning", "torch") if m in sys.modules))
        """
    assert _python(code, tmp_path) == "[]"


def test_with_the_hook_off_lightning_loads_untouched_and_importing_the_strategy_registers(
    tmp_path,
):
    code = """
        import sys
        import lightning_drift
        from lightning_drift import _lightning_hook
        hooked = any(isinstance(f, _lightning_hook._RegisterAfterLightning) for f in sys.meta_path)
        from lightning.pytorch.strategies import StrategyRegistry
        before = "drift" in StrategyRegistry
        import lightning_drift.node.strategy
        print(hooked, before, "drift" in StrategyRegistry)
        """
    assert _python(code, tmp_path, DRIFT_LIGHTNING_HOOK="0") == "False False True"
    # Lightning loaded first: the name is registered at once, hook or not.
    code = """
        from lightning.pytorch.strategies import StrategyRegistry
        import lightning_drift
        print("drift" in StrategyRegistry)
        """
    assert _python(code, tmp_path, DRIFT_LIGHTNING_HOOK="0") == "True"


def test_examples_yaml_names_the_strategy():
    text = (Path(__file__).parents[1] / "examples" / "train.yaml").read_text()
    assert "lightning_drift.DriftStrategy" in text


def test_the_token_comes_from_a_file_or_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DRIFT_TOKEN", raising=False)
    monkeypatch.delenv("DRIFT_TOKEN_FILE", raising=False)
    path = tmp_path / "node.token"
    path.write_text(TOKEN + "\n")
    assert DriftStrategy(token_file=str(path)).token == TOKEN
    assert DriftStrategy(token=str(path)).token == TOKEN  # a path given as the token
    monkeypatch.setenv("DRIFT_TOKEN_FILE", str(path))
    assert DriftStrategy().token == TOKEN
    monkeypatch.setenv("DRIFT_TOKEN", str(path))  # DRIFT_TOKEN may name a file too
    assert DriftStrategy().token == TOKEN
    monkeypatch.delenv("DRIFT_TOKEN")
    monkeypatch.setenv("DRIFT_TOKEN_FILE", str(tmp_path / "missing.token"))
    with pytest.raises(ConfigError, match="cannot read the token file .*missing.token"):
        DriftStrategy()


def test_a_masked_token_from_a_saved_config_falls_back_to_the_environment(monkeypatch):
    from jsonargparse.typing import SecretStr

    monkeypatch.setenv("DRIFT_TOKEN", TOKEN)
    assert DriftStrategy(token=SecretStr("**********")).token == TOKEN
    assert DriftStrategy(token=SecretStr("eyJ-other")).token == "eyJ-other"
    monkeypatch.delenv("DRIFT_TOKEN")
    with pytest.raises(ConfigError, match="DRIFT_TOKEN_FILE"):
        DriftStrategy(token="**********")


def test_lightning_cli_masks_the_token_in_the_config_it_saves(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "trainer:\n  accelerator: cpu\n  logger: false\n  strategy:\n"
        f"    class_path: lightning_drift.DriftStrategy\n    init_args:\n      token: {TOKEN}\n"
    )
    cli = LightningCLI(Tiny, run=False, args=["--config", str(cfg)], save_config_callback=None)
    assert cli.trainer.strategy.token == TOKEN
    # What SaveConfigCallback writes to config.yaml next to the logs:
    saved = cli.parser.dump(cli.config)
    assert TOKEN not in saved and "token: '**********'" in saved
class _Seen(L.LightningModule):
    """Counts training batches and when validation runs (after how many batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.batches = 0
        self.validated_after: list[int] = []

    def training_step(self, batch, batch_idx):
        self.batches += 1
        return self.lin(batch.float().unsqueeze(-1)).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.validated_after.append(self.batches)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _Positions(torch.utils.data.Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, i):
        return torch.tensor(i)


@pytest.mark.parametrize("follow", [False, True])
@pytest.mark.parametrize("ranges, batches", [([(0, 40), (60, 80)], 15), ([(0, 28)], 7)])
def test_lightning_follows_a_re_planned_epoch_only_when_told(tmp_path, follow, ranges, batches):
    # A re-plan grows (60 samples) or shrinks (28) the sampler after the 6th of 10 batches.
    # Lightning read the epoch's length at its start: on its own it cuts a grown epoch at the
    # old length (the moved samples would go untrained) and skips the end-of-epoch validation
    # of a shrunk one. follow_epoch_length sets the new length everywhere Lightning keeps it.
    from lightning.pytorch.callbacks import Callback

    from lightning_drift.node.loopstate import follow_epoch_length
    from lightning_drift.node.shards import ShardSampler
    from lightning_drift.protocol import ShardAssignment

    a = ShardAssignment(epoch=0, start=0, stop=40, rounds=2, first_round=1, seed=1)
    sampler = ShardSampler.for_assignment(a, 100)
    loader = DataLoader(_Positions(), batch_size=4, sampler=sampler)

    class Replan(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 5:
                assert sampler.update(ranges) == 0
                if follow:
                    follow_epoch_length(trainer, len(loader))

    model = _Seen()
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[Replan()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, loader, DataLoader(_Positions(), batch_size=4))
    if follow:
        assert model.batches == batches and model.validated_after == [batches]
    elif batches > 10:
        assert model.batches == 10 and model.validated_after == [10]  # cut at the old length
    else:
        assert model.batches == batches and model.validated_after == []  # no validation
