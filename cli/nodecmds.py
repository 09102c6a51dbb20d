"""What ``drift join``, ``drift train`` and ``drift status`` do, apart from parsing flags."""

from __future__ import annotations

import importlib.resources
import logging
import os
import sys
import tempfile
from pathlib import Path

from lightning_drift_cli.common import NodeLink, fetch_status, remember_token

from lightning_drift.auth import TOKEN_ENV
from lightning_drift.errors import AuthError, ConfigError

log = logging.getLogger(__name__)

# What `drift join` trains when neither it nor the coordinator names a LightningCLI config.
EXAMPLE_CONFIG = importlib.resources.files("lightning_drift_examples") / "train.yaml"


def join(link: NodeLink, config: Path | None) -> int:
    """Run LightningCLI on ``config`` (or the coordinator's config) with DriftStrategy set."""
    if link.token:
        from lightning_drift.auth import decode_token

        decode_token(link.token)  # a malformed token fails here, before Lightning is imported
        remember_token(link.token)
        os.environ[TOKEN_ENV] = link.token
    # Like `python -m`, let the config name modules next to where the user runs us.
    sys.path.insert(0, os.getcwd())
    if config is not None:
        return run_lightning_cli(config, link)
    if link.listen is not None:
        raise ConfigError(
            "a listening node needs --config: the coordinator's config can only be fetched "
            "once the coordinator dials in"
        )
    status = fetch_status(
        link.token,
        mode=link.mode,
        coordinator_addr=link.coordinator_addr,
        peer=link.peer,
        key_file=link.key_file,
    )
    if not status.lightning_config:
        # Nothing to hand out: train the example model, as `drift train` does, and say so.
        print(
            "note: the coordinator was started without --config, so it has no LightningCLI "
            "config to hand out; training the example char-level model "
            "(lightning_drift_examples/train.yaml). Pass `drift join --config train.yaml` "
            "to train your own.",
            file=sys.stderr,
            flush=True,
        )
        with importlib.resources.as_file(EXAMPLE_CONFIG) as example:
            return run_lightning_cli(example, link)
    tmp = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="drift-join-", delete=False)
    try:
        with tmp:
            tmp.write(status.lightning_config)
        return run_lightning_cli(Path(tmp.name), link)
    finally:
        Path(tmp.name).unlink(missing_ok=True)


def run_lightning_cli(config: Path, link: NodeLink) -> int:
    """Run LightningCLI on ``config`` with the node's link to its coordinator; the exit code."""
    if not config.is_file():
        raise ConfigError(f"config file {config} does not exist")
    from lightning.pytorch.cli import LightningCLI

    import lightning_drift  # noqa: F401  (registers the strategy)

    # Naming the class path (not the bare value) keeps the config's own init_args.
    args = ["fit", "--config", str(config)]
    args += ["--trainer.strategy.class_path", "lightning_drift.DriftStrategy"]
    for arg, value in (
        ("mode", link.mode),  # else the config's, else the token's
        ("coordinator_addr", link.coordinator_addr),
        ("peer", link.peer),
        ("listen", link.listen),
        ("key_file", link.key_file),
    ):
        if value is not None:
            args += [f"--trainer.strategy.init_args.{arg}", value]
    # LightningCLI(args=...) warns with the whole sys.argv when it has arguments, and this
    # process's arguments may hold the token (`drift join --token eyJ...`): it sees none.
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        LightningCLI(args=args, save_config_callback=None)
    finally:
        sys.argv = argv
    return 0


def _load_weights(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


LAST_CHECKPOINT = "last.ckpt"  # what Lightning's ModelCheckpoint(save_last=True) writes


def resume_path(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """The node checkpoint ``drift train --resume`` names: ``None`` (not given), ``""``
    (given without a value: ``checkpoint_dir/last.ckpt``) or a path. ConfigError when that
    file does not exist, before anything is built."""
    if resume is None:
        return None
    path = Path(resume) if resume else checkpoint_dir / LAST_CHECKPOINT
    if not path.is_file():
        where = f"the --checkpoint-dir {checkpoint_dir}" if not resume else str(path.parent)
        raise ConfigError(
            f"--resume: {path} does not exist; no node checkpoint to resume from in {where} "
            "(pass the --checkpoint-dir the node trained with, or --resume PATH)"
        )
    return path


def train(
    link: NodeLink,
    *,
    model_path: Path | None,
    dataset_path: Path | None,
    epochs: int,
    batch_size: int,
    resume: str | None,
    checkpoint_dir: Path,
    max_chars: int,
    d_model: int,
    n_layers: int,
    block_size: int,
    device: str,
    name: str | None,
    progress: bool,
) -> None:
    """Train the char-level transformer of ``examples/charlm`` as a node."""
    if link.token:
        from lightning_drift.auth import decode_token

        # A malformed token fails here, before the model and the data are built.
        claims, _, _ = decode_token(link.token)
        remember_token(link.token)
        if link.peer:
            from lightning_drift.peers import parse_peer
            from lightning_drift.transport import peer_key, ticket_key

            named, wanted = ticket_key(claims.coordinator), peer_key(parse_peer(link.peer))
            if named != wanted:
                raise AuthError(
                    f"the token names coordinator {named.hex()[:16]}…, not the peer "
                    f"{wanted.hex()[:16]}… asked for with --peer"
                )
    ckpt_path = resume_path(resume, checkpoint_dir)
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_drift_examples.charlm import CharDataModule, CharLM

    from lightning_drift import DriftStrategy

    data = CharDataModule(
        batch_size=batch_size, block_size=block_size, max_chars=max_chars, path=dataset_path
    )
    model = CharLM(d_model=d_model, n_layers=n_layers, block_size=block_size)
    if model_path is not None:
        missing, unexpected = model.load_state_dict(_load_weights(model_path), strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{model_path} does not fit the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}; pass weights saved from the same --d-model/--n-layers"
            )
    strategy = DriftStrategy(
        token=link.token,
        device=device,
        mode=link.mode,
        name=name,
        coordinator_addr=link.coordinator_addr,
        peer=link.peer,
        listen=link.listen,
        key_file=link.key_file,
    )
    callbacks: list = [ModelCheckpoint(dirpath=str(checkpoint_dir), save_last=True)]
    if model_path is not None:
        callbacks.append(_model_path_check(model_path))
    trainer = L.Trainer(
        strategy=strategy,
        # One device per node: devices="auto" would resolve every GPU of the machine, and
        # DriftStrategy refuses more than one (--device picks which).
        devices=1,
        max_epochs=epochs,
        default_root_dir=str(checkpoint_dir),
        callbacks=callbacks,
        enable_progress_bar=progress,
        log_every_n_steps=10,
    )
    trainer.fit(model, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None)


def model_path_unused(history: list[dict]) -> bool:
    """True when the start-up sync (``history[0]``) answered with weights the session already
    had instead of adopting this node's: its ``--model-path`` weights were replaced."""
    return bool(history) and not history[0].get("contributed", True)


def warn_model_path_unused(model_path: Path, history: list[dict]) -> bool:
    """Print a warning to stderr when ``--model-path`` was not used; returns whether it did."""
    if not model_path_unused(history):
        return False
    first = history[0]
    print(
        f"warning: --model-path {model_path} was not used: the session already had weights "
        f"(round {first.get('round', 0)}), and this node now trains from those. Initial "
        "weights only seed a session when their node is the first to reach the start-up sync "
        "(start it before the others, on a fresh coordinator state).",
        file=sys.stderr,
        flush=True,
    )
    return True


def _model_path_check(model_path: Path):
    """A callback that warns, once fit has started, if ``--model-path`` was replaced."""
    import msgspec
    from lightning.pytorch.callbacks import Callback

    class ModelPathCheck(Callback):
        # on_train_start runs after the train dataloader is set up, which is where the
        # strategy joins the session and holds the start-up sync (round 0).
        def on_train_start(self, trainer, pl_module) -> None:
            history = getattr(trainer.strategy, "history", [])  # BarrierRecords
            warn_model_path_unused(model_path, msgspec.to_builtins(history))

    return ModelPathCheck()
