"""What DriftStrategy costs one process: plain Lightning against a one-node drift session.

The example char-LM (``benchmarks/_common.py``) is trained in this process three ways:

- ``plain``: a plain Lightning ``Trainer`` (single device);
- ``drift``: ``DriftStrategy`` as the only node of a ``LocalCoordinator`` whose ``--sync-every``
  is so large that an epoch has one round: the only barriers are the start-up sync and the
  epoch end. This measures the strategy's per-step cost (shard sampler, step counting,
  progress reports, the node's network thread) with no barrier in the way;
- ``drift sync 50``: the same with ``--sync-every 50`` (barriers about every 50 steps), to
  measure the share of the fit's wall time spent waiting at barriers (upload, aggregation,
  checkpoint write, download, load), ``sum(strategy.history[i].wait_s) / fit wall time``.

Steps/s is taken between consecutive ``on_train_batch_end`` calls of one epoch, leaving out the
first ``--warmup`` steps and every step that held a barrier. ``--repeats`` alternates plain and
drift runs and compares medians. The default data size gives 201 steps per epoch, so the
coordinator plans 4 rounds per epoch at sync-every 50 (barriers after steps 51, 101, 151, 201).

    python benchmarks/overhead.py
    python benchmarks/overhead.py --repeats 3 --epochs 2 --update-docs

Prints a table and, last, the line
``overhead: drift/plain steps/s ratio <R>, barrier time fraction at sync_every=50: <F>``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402


def _timer(warmup: int) -> Any:
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Seconds between consecutive batch ends of an epoch, barrier steps left out: wall
        time, and this process's CPU time (all its threads, the node's network thread
        included), which other programs on the machine disturb much less."""

        def __init__(self) -> None:
            self.dts: list[float] = []
            self.cpu: list[float] = []
            self.seen = 0
            self.barrier_steps = 0
            self._last: float | None = None
            self._last_cpu = 0.0
            self._n = 0

        def _barriers(self, trainer: Any) -> int:
            return len(getattr(trainer.strategy, "history", ()))

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            # The epoch's first batch pays for the dataloader (and, in drift, the shard request).
            self._last = None
            self._n = self._barriers(trainer)

        def on_train_batch_end(self, trainer: Any, *args: Any, **kw: Any) -> None:
            now, cpu = time.perf_counter(), time.process_time()
            n = self._barriers(trainer)
            if self._last is not None and self.seen >= warmup:
                if n == self._n:
                    self.dts.append(now - self._last)
                    self.cpu.append(cpu - self._last_cpu)
                else:
                    self.barrier_steps += 1
            self._last, self._last_cpu, self._n = now, cpu, n
            self.seen += 1

        @property
        def steps_per_s(self) -> float:
            return len(self.dts) / sum(self.dts) if self.dts else float("nan")

        @property
        def cpu_ms_per_step(self) -> float:
            return 1000 * sum(self.cpu) / len(self.cpu) if self.cpu else float("nan")

    return StepTimer()


def fit_once(setup: c.Setup, epochs: int, warmup: int, token: str | None) -> dict[str, Any]:
    """One fit in this process: plain when ``token`` is None, else one drift node."""
    import lightning as L

    data = c.make_data(setup)
    model = c.make_model(setup)
    timer = _timer(warmup)
    strategy: Any = "auto"
    kw: dict[str, Any] = {"accelerator": "cpu", "devices": 1}
    if token is not None:
        from lightning_drift import DriftStrategy

        strategy = DriftStrategy(token=token, name="overhead")
        kw = {}
    trainer = L.Trainer(
        strategy=strategy, max_epochs=epochs, callbacks=[timer], **kw, **c.trainer_kwargs()
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - t0
    history = list(getattr(trainer.strategy, "history", []))
    return {
        "steps_per_s": timer.steps_per_s,
        "cpu_ms": timer.cpu_ms_per_step,
        "timed_steps": len(timer.dts),
        "barrier_steps": timer.barrier_steps,
        "steps": trainer.global_step,
        "fit_s": wall,
        "barriers": len(history),
        "wait_s": sum(e.wait_s for e in history),
    }


def fit_drift(
    setup: c.Setup, epochs: int, warmup: int, sync_every: int, work: Path
) -> dict[str, Any]:
    from lightning_drift_cli.local import LocalCoordinator

    coord = LocalCoordinator(
        work,
        min_nodes=1,
        epochs=epochs,
        batch_size=setup.batch_size,
        sync_every=sync_every,
        seed=setup.seed,
    )
    with coord:
        try:
            res = fit_once(setup, epochs, warmup, coord.token)
        except Exception as exc:
            raise RuntimeError(
                f"drift fit failed; coordinator log {coord.log_path}:\n{coord.log_tail()}"
            ) from exc
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    c.Setup.add_args(ap, max_chars=456_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out at the start")
    ap.add_argument("--sync-every", type=int, default=50, help="for the barrier-time run")
    ap.add_argument("--repeats", type=int, default=1, help="plain/drift pairs (medians)")
    ap.add_argument("--update-docs", action="store_true", help="write the table into docs")
    args = ap.parse_args()
    setup = c.Setup.from_args(args)
    c.configure_torch(setup)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="drift-overhead-"))

    plain: list[dict[str, Any]] = []
    quiet: list[dict[str, Any]] = []
    for i in range(args.repeats):
        print(f"repeat {i + 1}/{args.repeats}: plain ...", flush=True)
        plain.append(fit_once(setup, args.epochs, args.warmup, None))
        print(f"repeat {i + 1}/{args.repeats}: drift, one round per epoch ...", flush=True)
        quiet.append(fit_drift(setup, args.epochs, args.warmup, 10**9, work / f"quiet-{i}"))
    print(f"drift, sync every {args.sync_every} ...", flush=True)
    synced = fit_drift(setup, args.epochs, args.warmup, args.sync_every, work / "sync")

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    base_sps, base_fit = med(plain, "steps_per_s"), med(plain, "fit_s")
    base_cpu = med(plain, "cpu_ms")
    ratio = med(quiet, "steps_per_s") / base_sps
    fraction = synced["wait_s"] / synced["fit_s"]
    rows = []
    for name, runs in (
        ("plain", plain),
        ("drift (barriers: start-up + epoch ends)", quiet),
        (f"drift (sync-every {args.sync_every})", [synced]),
    ):
        sps, fit, wait = med(runs, "steps_per_s"), med(runs, "fit_s"), med(runs, "wait_s")
        cpu = med(runs, "cpu_ms")
        rows.append(
            [
                name,
                str(len(runs)),
                str(runs[0]["steps"]),
                str(runs[0]["timed_steps"]),
                str(runs[0]["barriers"]),
                f"{sps:.2f}",
                f"{sps / base_sps:.3f}",
                f"{cpu:.1f}",
                f"{cpu / base_cpu:.3f}",
                f"{fit:.1f}",
                f"{fit / base_fit:.3f}",
                f"{wait:.2f}",
                f"{wait / fit:.3f}",
            ]
        )
    headers = [
        "run", "runs", "steps", "timed", "barriers", "steps/s", "vs plain", "CPU ms/step",
        "CPU vs plain", "fit s",
        "fit vs plain", "barrier wait s", "wait/fit",
    ]  # fmt: skip
    notes = [
        f"Setup: {setup.describe()}; {args.epochs} epoch(s), one process, coordinator on "
        "loopback (a child process on the same cores).",
        f"steps/s: timed steps (all but the first {args.warmup} and the barrier steps) over "
        "their summed batch-end to batch-end seconds; medians over runs. CPU ms/step: this "
        "process's CPU time (every thread, the node's network thread included; the coordinator "
        "process not) per timed step: less disturbed by other programs on a shared machine.",
        "fit s: the whole trainer.fit, drift's join, calibration and barriers included.",
        "barriers: entries of strategy.history (round 0, the start-up sync, included); barrier "
        "wait s: their summed wait_s; wait/fit: that over fit s.",
    ]
    text = c.table(headers, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    summary = (
        f"overhead: drift/plain steps/s ratio {ratio:.3f}, barrier time fraction at "
        f"sync_every={args.sync_every}: {fraction:.3f}"
    )
    print()
    print(text)
    if args.update_docs:
        c.update_docs("overhead", f"```\n{c.command_line()}\n```\n\n{text}\n\n`{summary}`")
    print(summary)


if __name__ == "__main__":
    main()
