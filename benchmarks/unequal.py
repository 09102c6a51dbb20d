"""Time to a validation loss on unequal machines: nodes of speeds 1x, 1x, 2x, 4x against four
equal nodes of the same total compute (2x each).

Two sessions run one after the other, each a ``LocalCoordinator`` (``--aggregation diloco
--transfer-dtype topk`` by default, quorum 1, every checkpoint kept) and one node process per
speed with ``DriftStrategy``, on the same model, data and seed (``benchmarks/_common.py``):

- ``unequal``: ``--speeds`` (default 1,1,2,4);
- ``equal``: as many nodes, each of the mean speed (2,2,2,2): the same compute per second.

The machines are simulated on one host: a node of speed ``s`` is throttled by a Lightning
callback that sleeps at the end of each optimizer step until the step has taken at least
``--step-seconds / s`` (barrier waits, which the strategy keeps out of the node's pace, do not
count toward it). The sleep is training time to the node, so the pace it shows follows its
speed, and the coordinator's plans and re-plans can follow that pace. The default model is
small enough that a 4x node's budget stays well above the compute of a step on a busy
machine.

Every round writes a checkpoint; its time in the checkpoint manifest (``checkpoint.py``: the
coordinator's clock when the round was written) minus the time the session's coordinator was
started is when the session had those weights. This process evaluates every round's weights
with ``_common.evaluate``; the target is the higher (worse) of the two sessions' final
validation losses, so both reach it, and each session's time to target is the time of its
first round at or below it.

    python benchmarks/unequal.py                      # about 9 minutes on 2 busy cores
    python benchmarks/unequal.py --speeds 1,3 --epochs 4
    python benchmarks/unequal.py --update-docs

Prints a table (per session: speeds, optimizer steps per node, rounds, final val loss, time
to target, wall time) and, last, one line:
``unequal: speeds 1/1/2/4 reach val loss <L> in <r>x the time of 2/2/2/2 (<t1> s vs <t2> s)``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

SECTION = "unequal"
KEEP_EVERY_ROUND = 100_000  # the coordinator's --keep: no round checkpoint is deleted
MOVED = re.compile(r"epoch (\d+) round (\d+): .*?moved (\d+) samples")


def parse_speeds(text: str) -> list[float]:
    """``"1,1,2,4"`` -> ``[1.0, 1.0, 2.0, 4.0]`` (each > 0, at least two)."""
    speeds = [float(s) for s in text.split(",") if s.strip()]
    if len(speeds) < 2 or any(not s > 0 for s in speeds):
        raise ValueError(f"--speeds needs at least two positive numbers, got {text!r}")
    return speeds


def equal_speeds(speeds: list[float]) -> list[float]:
    """As many nodes, each of the mean speed: the same total compute per second."""
    mean = sum(speeds) / len(speeds)
    return [mean] * len(speeds)


def show_speeds(speeds: list[float]) -> str:
    return "/".join(f"{s:g}" for s in speeds)


# ---------------------------------------------------------------------------- worker processes


def _throttle(step_s: float) -> Any:
    """A callback that makes every optimizer step last at least ``step_s`` seconds of
    training, and counts each epoch's steps."""
    from lightning.pytorch.callbacks import Callback

    class Throttle(Callback):
        def __init__(self) -> None:
            self.t0 = 0.0
            self.barriers = 0
            self.slept = 0.0
            self.epoch_steps: list[int] = []
            self.steps_before = 0

        def on_train_batch_start(self, trainer: Any, *a: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()
            self.barriers = len(trainer.strategy.history)

        def on_train_batch_end(self, trainer: Any, *a: Any, **kw: Any) -> None:
            # A barrier held inside this step waited for its round (BarrierRecord.wait_s):
            # the node's pace leaves that wait out, and so does the step's budget.
            waited = sum(r.wait_s for r in trainer.strategy.history[self.barriers :])
            left = step_s - (time.perf_counter() - self.t0 - waited)
            if left > 0:
                time.sleep(left)
                self.slept += left

        def on_train_epoch_end(self, trainer: Any, *a: Any, **kw: Any) -> None:
            self.epoch_steps.append(trainer.global_step - self.steps_before)
            self.steps_before = trainer.global_step

    return Throttle()


def _worker(args: argparse.Namespace, setup: c.Setup) -> None:
    """One drift node of speed ``--speed``: trains, then writes a report."""
    c.configure_torch(setup)
    import lightning as L

    from lightning_drift import DriftStrategy

    throttle = _throttle(args.step_seconds / args.speed)
    trainer = L.Trainer(
        strategy=DriftStrategy(token=args.token, name=args.name),
        max_epochs=args.epochs,
        callbacks=[throttle],
        **c.trainer_kwargs(),
    )
    t0 = time.perf_counter()
    trainer.fit(c.make_model(setup), datamodule=c.make_data(setup))
    report = {
        "fit_s": time.perf_counter() - t0,
        "steps": trainer.global_step,
        "epoch_steps": throttle.epoch_steps,
        "slept_s": throttle.slept,
        "barriers": len(trainer.strategy.history),
    }
    c.write_json(Path(args.out) / "report.json", report)


# ---------------------------------------------------------------------------- one session


def _launch(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=c.child_env(), cwd=c.ROOT
    )


def _node_cmd(
    args: argparse.Namespace, setup: c.Setup, out: Path, token: str, name: str, speed: float
) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out),
        "--token", token, "--name", name, "--speed", repr(speed),
        "--step-seconds", repr(args.step_seconds), "--epochs", str(args.epochs), *setup.argv(),
    ]  # fmt: skip


def _coordinator(args: argparse.Namespace, setup: c.Setup, base: Path, nodes: int) -> Any:
    from lightning_drift_cli.local import LocalCoordinator

    return LocalCoordinator(
        base / "coord",
        min_nodes=nodes,
        epochs=args.epochs,
        batch_size=setup.batch_size,
        sync_every=args.sync_every,
        aggregation=args.aggregation,
        transfer_dtype=args.transfer_dtype,
        quorum=1.0,
        seed=setup.seed,
        keep=KEEP_EVERY_ROUND,
        verbose=True,  # why a re-plan moved nothing is a debug line
    )


def run_session(
    args: argparse.Namespace, setup: c.Setup, label: str, speeds: list[float], work: Path
) -> dict[str, Any]:
    """A coordinator and one node per speed; returns what the report needs."""
    base = work / label
    base.mkdir(parents=True, exist_ok=True)
    coord = _coordinator(args, setup, base, len(speeds))
    started = time.time()  # the manifest's times are the coordinator's time.time()
    t0 = time.perf_counter()
    coord.start(timeout=120)
    try:
        procs = []
        for i, speed in enumerate(speeds):
            out, log = base / f"node-{i}", base / f"node-{i}.log"
            cmd = _node_cmd(args, setup, out, coord.token, f"node-{i}", speed)
            procs.append((f"{label} node-{i}", _launch(cmd, log), log))
        c.wait_nodes(coord, procs, args.timeout)
        wall = time.perf_counter() - t0
        with contextlib.suppress(subprocess.TimeoutExpired):
            coord.wait(timeout=60)
        manifest = coord.manifest()
    finally:
        coord.stop()
    rounds = [
        (int(e["round"]), float(e["time"]) - started, coord.checkpoint_dir / e["file"])
        for e in sorted(manifest["checkpoints"], key=lambda e: e["round"])
    ]
    log_text = coord.log_path.read_text(errors="replace")
    measured = measured_paces(coord.state_dir / "state.json")
    return {
        "label": label,
        "speeds": speeds,
        "wall_s": wall,
        "rounds": rounds,
        "reports": [c.read_json(base / f"node-{i}" / "report.json") for i in range(len(speeds))],
        "replans": replans_in(log_text),
        "measured": [measured.get(f"node-{i}", 0.0) for i in range(len(speeds))],
        "log": coord.log_path,
    }


def replans_in(log_text: str) -> dict[tuple[int, int], int]:
    """The re-plans a coordinator's log tells of: (epoch, open round) -> samples moved. At
    most one per open round; each is logged twice (the event, and its debug line)."""
    return {(int(e), int(r)): int(n) for e, r, n in MOVED.findall(log_text)}


def measured_paces(state_file: Path) -> dict[str, float]:
    """Each node's measured pace (samples/s) at the session's end, by node name, from the
    coordinator's state file (``coordinator/state.py``): what its plans went by."""
    try:
        session = c.read_json(state_file)["session"]
        members = session["roster"]["members"]
        paces = session["paces"]["nodes"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {m["name"]: float(paces.get(n, {}).get("measured", 0.0)) for n, m in members.items()}


# ---------------------------------------------------------------------------- time to loss


def add_losses(setup: c.Setup, data: Any, session: dict[str, Any]) -> None:
    """Every round checkpoint's val loss: ``session["curve"]`` = [(round, s, loss)]."""
    session["curve"] = [
        (r, t, c.evaluate(setup, c.load_weights(path), data)) for r, t, path in session["rounds"]
    ]
    session["final_loss"] = session["curve"][-1][2]


def time_to(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float]:
    """The first round at or below ``target`` and its time (seconds since the coordinator
    started); the last round when none is (float rounding of equal losses)."""
    for r, t, loss in curve:
        if loss <= target:
            return r, t
    return curve[-1][0], curve[-1][1]


def round_seconds(curve: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Median and longest time between consecutive rounds after round 0 (the start-up sync)."""
    gaps = sorted(b[1] - a[1] for a, b in zip(curve[1:], curve[2:], strict=False))
    if not gaps:
        return 0.0, 0.0
    return gaps[len(gaps) // 2], gaps[-1]


# ---------------------------------------------------------------------------- report


def _row(s: dict[str, Any], target: float) -> list[str]:
    hit, t = time_to(s["curve"], target)
    first = s["curve"][1][1] if len(s["curve"]) > 1 else 0.0
    return [
        s["label"],
        show_speeds(s["speeds"]),
        "/".join(str(r["steps"]) for r in s["reports"]),
        str(s["curve"][-1][0]),
        f"{s['final_loss']:.4f}",
        f"{t:.0f} (round {hit})",
        f"{t - first:.0f}",
        f"{s['wall_s']:.0f}",
    ]


def _session_notes(args: argparse.Namespace, setup: c.Setup, s: dict[str, Any]) -> str:
    median, longest = round_seconds(s["curve"])
    epochs = zip(*(r["epoch_steps"] for r in s["reports"]), strict=False)
    per_epoch = ", ".join("/".join(str(n) for n in e) for e in epochs)
    moved = sum(s["replans"].values())
    own = "/".join(f"{setup.batch_size * v / args.step_seconds:.0f}" for v in s["speeds"])
    measured = "/".join(f"{v:.0f}" for v in s["measured"])
    return (
        f"{s['label']} ({show_speeds(s['speeds'])}): steps per node in each epoch "
        f"{per_epoch}; {len(s['replans'])} re-plan(s) within an epoch moved {moved} samples; "
        f"seconds between rounds: median {median:.1f}, longest {longest:.1f}; the "
        f"coordinator's measured paces at the end {measured} samples/s (the nodes train "
        f"{own})."
    )


def report(
    args: argparse.Namespace, setup: c.Setup, sessions: list[dict[str, Any]], target: float
) -> str:
    headers = [
        "session", "speeds", "steps/node", "rounds", "final val loss", "time to target s",
        "after round 1 s", "wall s",
    ]  # fmt: skip
    rows = [_row(s, target) for s in sessions]
    notes = [
        f"Setup: {setup.describe()}; {args.epochs} epochs; --aggregation {args.aggregation} "
        f"--transfer-dtype {args.transfer_dtype} --sync-every {args.sync_every}, quorum 1; a "
        f"node of speed s takes at least {args.step_seconds:g}/s seconds per optimizer step.",
        f"Target: val loss {target:.4f}, the higher of the two sessions' final val losses. "
        "time to target: seconds from starting the session's coordinator to the checkpoint "
        "of its first round at or below the target (node start-up and the start-up sync "
        "included); after round 1: the same, from round 1's checkpoint; wall: coordinator "
        "start to the last node's exit.",
        "steps/node: each node's optimizer steps over the session, in the order of the "
        "speeds; its shard follows its measured pace (calibration for the first epoch's plan, "
        "re-plans within an epoch, measured paces for the next epochs' plans).",
        *(_session_notes(args, setup, s) for s in sessions),
        "The same work: the last round's checkpoint at "
        + " vs ".join(f"{s['curve'][-1][1]:.0f} s" for s in sessions)
        + f" ({sessions[0]['curve'][-1][1] / sessions[1]['curve'][-1][1]:.2f}x).",
    ]
    return c.table(headers, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def summary(sessions: list[dict[str, Any]], target: float) -> str:
    unequal, equal = sessions
    t1, t2 = time_to(unequal["curve"], target)[1], time_to(equal["curve"], target)[1]
    return (
        f"unequal: speeds {show_speeds(unequal['speeds'])} reach val loss {target:.4f} in "
        f"{t1 / t2:.2f}x the time of {show_speeds(equal['speeds'])} ({t1:.0f} s vs {t2:.0f} s)"
    )


# ---------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    c.Setup.add_args(ap, block_size=32, batch_size=16, d_model=32, n_layers=1)
    ap.add_argument("--speeds", default="1,1,2,4", help="the unequal nodes' speeds")
    ap.add_argument(
        "--step-seconds",
        type=float,
        default=0.4,
        help="seconds per optimizer step of a speed-1 node (speed s: this / s)",
    )
    ap.add_argument("--epochs", type=int, default=8, help="epochs of each session")
    ap.add_argument("--sync-every", type=int, default=20, help="steps per round (H)")
    ap.add_argument("--aggregation", choices=("mean", "diloco"), default="diloco")
    ap.add_argument(
        "--transfer-dtype", choices=("float32", "bfloat16", "int8", "topk"), default="topk"
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds per session")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs' files here")
    ap.add_argument("--update-docs", action="store_true", help="write the table into docs")
    ap.add_argument("--section", default=SECTION, help="docs section --update-docs writes")
    # internal: run one node
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="node", help=argparse.SUPPRESS)
    ap.add_argument("--speed", type=float, default=1.0, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    setup = c.Setup.from_args(args)
    if args.worker:
        _worker(args, setup)
        return
    try:
        speeds = parse_speeds(args.speeds)
    except ValueError as exc:
        ap.error(str(exc))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="drift-unequal-"))
    work.mkdir(parents=True, exist_ok=True)
    c.configure_torch(setup)
    data = c.make_data(setup)
    sessions = []
    t0 = time.perf_counter()
    for label, group in (("unequal", speeds), ("equal", equal_speeds(speeds))):
        print(f"running {label} ({show_speeds(group)}) ...", flush=True)
        s = run_session(args, setup, label, group, work / "runs")
        add_losses(setup, data, s)
        print(
            f"  {label}: {s['curve'][-1][0]} rounds, final val loss {s['final_loss']:.4f}, "
            f"wall {s['wall_s']:.0f} s; coordinator log {s['log']}",
            flush=True,
        )
        sessions.append(s)
    target = max(s["final_loss"] for s in sessions)
    c.conclude(args, report(args, setup, sessions, target), summary(sessions, target),
               "both sessions", t0, work)  # fmt: skip


if __name__ == "__main__":
    main()
