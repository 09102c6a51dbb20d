"""Helpers shared by benchmarks/overhead.py and benchmarks/convergence.py.

Both benchmarks train the example char-LM (``lightning_drift_examples.charlm``) on the Python
standard library's source. ``Setup`` holds the model and data settings; every process of a run
builds its model and data from the same ``Setup`` (passed on the command line), so the model
is identical everywhere, including its seeded initial weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


@dataclass
class Setup:
    """Model, data and optimisation settings of one benchmark run."""

    max_chars: int = 200_000
    block_size: int = 64
    batch_size: int = 32
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    lr: float = 3e-3
    seed: int = 0
    threads: int = 1  # torch threads per training process
    stride: int = 0  # bytes between training windows; 0: block_size (windows do not overlap)

    @classmethod
    def add_args(cls, ap: argparse.ArgumentParser, **defaults: Any) -> None:
        """Add one ``--flag`` per field (defaults overridable per benchmark)."""
        for f in fields(cls):
            default = defaults.get(f.name, f.default)
            ap.add_argument(
                "--" + f.name.replace("_", "-"),
                type=type(f.default),
                default=default,
                help=f"(default {default})",
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Setup:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def argv(self) -> list[str]:
        """The flags that rebuild this Setup in a child process."""
        out: list[str] = []
        for k, v in asdict(self).items():
            out += ["--" + k.replace("_", "-"), str(v)]
        return out

    def describe(self) -> str:
        return (
            f"char-LM d_model={self.d_model} n_layers={self.n_layers} n_heads={self.n_heads} "
            f"block={self.block_size}, batch {self.batch_size}/process, AdamW lr={self.lr}, "
            f"{self.max_chars} bytes of stdlib source"
            + (f" (a window every {self.stride} bytes)" if self.stride else "")
            + f", seed {self.seed}, {self.threads} torch thread(s)/process"
        )


def configure_torch(setup: Setup) -> None:
    import torch

    torch.set_num_threads(setup.threads)


def make_data(setup: Setup) -> Any:
    from lightning_drift_examples.charlm import CharDataModule

    data = CharDataModule(
        max_chars=setup.max_chars,
        block_size=setup.block_size,
        stride=setup.stride or None,
        batch_size=setup.batch_size,
    )
    data.setup("fit")
    return data


def make_model(setup: Setup) -> Any:
    """The char-LM with the run's seeded initial weights (identical in every process)."""
    import torch
    from lightning_drift_examples.charlm import CharLM

    torch.manual_seed(setup.seed)
    return CharLM(
        d_model=setup.d_model,
        n_layers=setup.n_layers,
        n_heads=setup.n_heads,
        block_size=setup.block_size,
        lr=setup.lr,
    )


def trainer_kwargs() -> dict[str, Any]:
    """Quiet Trainer settings: no validation, logging, checkpoints or bars inside ``fit``."""
    return {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }


def evaluate(setup: Setup, state_dict: dict[str, Any], data: Any | None = None) -> float:
    """Mean next-byte cross-entropy over every window of the validation text.

    The one evaluation every benchmark uses: fixed windows, summed per token in float64, so
    the figure depends only on the weights.
    """
    import torch
    import torch.nn.functional as F

    data = data or make_data(setup)
    model = make_model(setup)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in data.val_dataloader():
            logits = model(x)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            )
            total += float(loss.double())
            count += y.numel()
    return total / max(1, count)


def param_bytes(model: Any) -> int:
    """Bytes of the trainable parameters (what DDP all-reduces as gradients each step)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def save_weights(model: Any, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


def child_env() -> dict[str, str]:
    """Environment for child processes: unbuffered, the repository importable, one thread each
    for the libraries that start their own pools."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def wait_all(procs: list[tuple[str, subprocess.Popen[bytes], Path]], timeout: float) -> None:
    """Wait for every process; on a timeout or a failure kill the rest and raise with log tails."""
    deadline = time.monotonic() + timeout
    failed: list[str] = []
    for name, proc, log in procs:
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            failed.append(
                f"{name} {'timed out' if code is None else f'exited {code}'}; log {log}:\n"
                f"{tail(log)}"
            )
            break
    if failed:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        raise RuntimeError("\n\n".join(failed))


def command_line() -> str:
    """The command that is running, as one could type it again from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def fmt_bytes(n: float) -> str:
    if n <= 0:
        return "0"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(len(units) - 1, int(math.log(n, 1024)))
    return f"{n / 1024**i:.1f} {units[i]}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (also readable as plain text)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def wait_nodes(coord: Any, procs: list[tuple[str, Any, Path]], timeout: float) -> None:
    """Wait for a session's node processes (:func:`wait_all`); a failure shows the
    coordinator's log too."""
    try:
        wait_all(procs, timeout)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{exc}\n\ncoordinator log {coord.log_path}:\n{coord.log_tail()}"
        ) from None


def conclude(args: Any, text: str, line: str, what: str, t0: float, work: Path) -> None:
    """A benchmark's end: its table, how long ``what`` took since ``t0``, the docs block
    (``--update-docs``, in ``--section``), the work folder removed unless ``--workdir`` kept
    it, and its one last line."""
    print()
    print(text)
    print(f"\n({what}: {(time.perf_counter() - t0) / 60:.1f} min)")
    if args.update_docs:
        update_docs(args.section, f"```\n{command_line()}\n```\n\n{text}\n\n`{line}`")
    if args.workdir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(line)


def update_docs(section: str, body: str, path: Path = DOCS) -> None:
    """Replace the text between ``<!-- BEGIN section -->`` and ``<!-- END section -->``."""
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    text = path.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {begin} ... {end} block; add one to update it")
    path.write_text(pattern.sub(lambda _: f"{begin}\n{body.rstrip()}\n{end}", text))
