"""Convergence and bytes for the same samples: one process, torch DDP (gloo), and drift with
each aggregation and transfer codec.

Every method trains the example char-LM from the same seeded initial weights on the same data
(``benchmarks/_common.py``) for the same number of epochs, so every method sees the same
samples; each process uses ``--batch-size`` per step:

- ``single``: one process, plain Lightning (``epochs * N / B`` optimizer steps);
- ``ddp``: ``--nodes`` processes, Lightning ``strategy=DDPStrategy(process_group_backend="gloo")``
  on CPU (the DistributedSampler gives each process 1/n of every epoch; gradients are
  all-reduced every step, so the global batch is ``n * B``);
- drift, ``<aggregation>[-<dtype>]``: ``--nodes`` node processes with ``DriftStrategy`` and a
  ``LocalCoordinator`` (``--aggregation mean|diloco --sync-every H --transfer-dtype dtype``,
  quorum 1 so that every node's samples count): ``mean`` and ``diloco`` send float32 weights,
  ``mean-int8``, ``diloco-int8``, ``mean-bfloat16`` ... compressed changes both ways.

The epochs are the fewest that give every drift node at least ``--steps`` optimizer steps
(``--epochs`` sets them instead). Each run saves its final weights; this process then
evaluates all of them with one function on one validation set (``_common.evaluate``). Every
training process gets ``--threads`` torch threads.

    python benchmarks/convergence.py                   # the headline setting (about 20 min)
    python benchmarks/convergence.py --nodes 4         # 4 nodes, 1500+ steps each
    python benchmarks/convergence.py --methods ddp,mean-int8,diloco-int8 --sync-every 50
    python benchmarks/convergence.py --update-docs

Prints the table (val loss and bytes as ratios to DDP's), then one line:
``convergence: best drift <method> val loss/ddp <r>, bytes/ddp <b> (nodes <n>, H <h>, <dtype>)``
where the best drift method is the one of lowest val loss among those within a thousandth of
DDP's bytes (or among all of them when none is).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

AGGREGATIONS = ("mean", "diloco")
DTYPES = ("float32", "bfloat16", "int8", "int4", "int3", "int2", "sign", "topk")
DEFAULT_METHODS = ("single", "ddp", "mean", "mean-int8", "diloco-int8")
BYTES_TARGET = 0.001  # "best" drift method: at most a thousandth of DDP's bytes


def drift_method(name: str) -> tuple[str, str] | None:
    """``(aggregation, transfer dtype)`` of a drift method name, or None for single/ddp. The
    dtype ``up/down`` (``diloco-sign/int4``) gives the answers their own codec
    (``--download-dtype``)."""
    agg, _, dtype = name.partition("-")
    if agg not in AGGREGATIONS:
        return None
    dtype = dtype or "float32"
    if any(d not in DTYPES for d in dtype.split("/")) or dtype.count("/") > 1:
        raise ValueError(
            f"{name}: transfer dtype must be one of {', '.join(DTYPES)}, or two of them as "
            "uploads/answers (sign/int4)"
        )
    return agg, dtype


# ---------------------------------------------------------------------------- worker processes


def _worker(args: argparse.Namespace, setup: c.Setup) -> None:
    """One training process (its kind is ``--worker``); writes final weights and a report."""
    c.configure_torch(setup)
    import lightning as L
    import msgspec
    import torch
    from lightning.pytorch.callbacks import Callback

    class Counter(Callback):
        def __init__(self) -> None:
            self.samples = 0
            self.backend = ""
            self.world_size = 1

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                self.backend = str(torch.distributed.get_backend())
                self.world_size = torch.distributed.get_world_size()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *a: Any, **kw: Any) -> None:
            self.samples += len(a[1][0])  # batch = (x, y)

    data = c.make_data(setup)
    model = c.make_model(setup)
    counter = Counter()
    kw: dict[str, Any] = {"accelerator": "cpu", "devices": 1}
    strategy: Any = "auto"
    if args.worker == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
        kw["devices"] = args.nodes
    elif args.worker == "drift":
        from lightning_drift import DriftStrategy

        strategy = DriftStrategy(token=args.token, name=args.name)
        kw = {}
    trainer = L.Trainer(
        strategy=strategy,
        max_epochs=args.epochs,
        callbacks=[counter],
        **kw,
        **c.trainer_kwargs(),
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_s = time.perf_counter() - t0
    rank = trainer.global_rank
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        c.save_weights(model, out / "final.safetensors")
    report = {
        "rank": rank,
        "fit_s": fit_s,
        "steps": trainer.global_step,
        "samples": counter.samples,
        "backend": counter.backend,
        "world_size": counter.world_size,
        "param_bytes": c.param_bytes(model),
        "history": msgspec.to_builtins(getattr(trainer.strategy, "history", [])),
    }
    c.write_json(out / f"report-{rank}.json", report)


# ---------------------------------------------------------------------------- the methods


def _worker_cmd(args: argparse.Namespace, setup: c.Setup, kind: str, out: Path) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--out", str(out),
        "--epochs", str(args.epochs), "--nodes", str(args.nodes), *setup.argv(),
    ]  # fmt: skip


def _launch(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=c.child_env(), cwd=c.ROOT
    )


def run_plain(args: argparse.Namespace, setup: c.Setup, kind: str, work: Path) -> dict[str, Any]:
    """``single`` or ``ddp``: one launched process (Lightning starts the other DDP ranks)."""
    out = work / kind
    log = work / f"{kind}.log"
    if args.reuse is not None:  # single and ddp are exactly reproducible: take an earlier run
        out = args.reuse / "runs" / kind
        if not (out / "final.safetensors").exists():
            raise RuntimeError(f"--reuse {args.reuse}: no {kind} run there ({out})")
        wall = 0.0
    else:
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        proc = _launch(_worker_cmd(args, setup, kind, out), log)
        c.wait_all([(kind, proc, log)], args.timeout)
        wall = time.perf_counter() - t0
    reports = [c.read_json(p) for p in sorted(out.glob("report-*.json"))]
    n = 1 if kind == "single" else args.nodes
    if len(reports) != n:
        raise RuntimeError(f"{kind}: expected {n} reports, found {len(reports)}:\n{c.tail(log)}")
    res: dict[str, Any] = {
        "method": kind,
        "processes": n,
        "weights": out / "final.safetensors",
        "wall_s": wall or max(r["fit_s"] for r in reports),
        "fit_s": max(r["fit_s"] for r in reports),
        "samples": sum(r["samples"] for r in reports),
        "steps": str(reports[0]["steps"]),
        "bytes": 0.0,
        "rounds": "",
    }
    if kind == "ddp":
        backends = {r["backend"] for r in reports}
        if backends != {"gloo"} or {r["world_size"] for r in reports} != {n}:
            raise RuntimeError(f"ddp ran with backends {backends}, not gloo on {n} processes")
        # Ring all-reduce: each process sends 2(n-1)/n of the gradient bytes per step; every
        # byte sent is received once, so the network carries the sum over the n processes.
        per_process = reports[0]["param_bytes"] * reports[0]["steps"] * 2 * (n - 1) / n
        res["bytes"] = per_process * n
    return res


def run_drift(args: argparse.Namespace, setup: c.Setup, method: str, work: Path) -> dict[str, Any]:
    """A drift method: a LocalCoordinator and ``--nodes`` node processes."""
    from lightning_drift_cli.local import LocalCoordinator

    agg, dtype = drift_method(method) or ("mean", "float32")
    base = work / method.replace("/", "+")
    base.mkdir(parents=True, exist_ok=True)
    outer = {}
    if agg == "diloco":
        outer = {"outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum}
    coord = LocalCoordinator(
        base / "coord",
        min_nodes=args.nodes,
        epochs=args.epochs,
        batch_size=setup.batch_size,
        sync_every=args.sync_every,
        aggregation=agg,
        transfer_dtype=dtype.partition("/")[0],
        download_dtype=dtype.partition("/")[2] or "same",
        quorum=1.0,
        seed=setup.seed,
        overlap=args.overlap == "on",
        residual=args.residual,
        **{k: v for k, v in outer.items() if v is not None},
    )
    t0 = time.perf_counter()
    coord.start(timeout=120)
    try:
        procs = []
        for i in range(args.nodes):
            out = base / f"node-{i}"
            log = base / f"node-{i}.log"
            cmd = _worker_cmd(args, setup, "drift", out)
            cmd += ["--token", coord.token, "--name", f"node-{i}"]
            procs.append((f"{method} node-{i}", _launch(cmd, log), log))
        c.wait_nodes(coord, procs, args.timeout)
        wall = time.perf_counter() - t0
        with contextlib.suppress(subprocess.TimeoutExpired):
            coord.wait(timeout=60)
        final_ckpt = coord.latest_checkpoint()
    finally:
        coord.stop()
    reports = [c.read_json(base / f"node-{i}" / "report-0.json") for i in range(args.nodes)]
    histories = [r["history"] for r in reports]
    # Every node must end on the coordinator's final checkpoint; evaluate that one weight set.
    final = c.load_weights(final_ckpt)
    for i in range(args.nodes):
        mine = c.load_weights(base / f"node-{i}" / "final.safetensors")
        if mine.keys() != final.keys() or any(not mine[k].equal(final[k]) for k in final):
            raise RuntimeError(f"{method}: node-{i}'s final weights differ from {final_ckpt}")
    left_out = sum(1 for h in histories for e in h if not e["contributed"] and e["round"] > 0)
    # The start-up sync: each node's first barrier (round 0).
    startup = sum(h[0]["bytes_sent"] + h[0]["bytes_received"] for h in histories if h)
    return {
        "method": f"drift {method}",
        "aggregation": agg,
        "dtype": dtype,
        "processes": args.nodes,
        "weights": final_ckpt,
        "wall_s": wall,
        "fit_s": max(r["fit_s"] for r in reports),
        "samples": sum(r["samples"] for r in reports),
        "steps": "/".join(str(r["steps"]) for r in reports),  # shards follow capability
        "bytes": float(sum(e["bytes_sent"] + e["bytes_received"] for h in histories for e in h)),
        "rounds": str(max((e["round"] for h in histories for e in h), default=0)),
        "left_out": left_out,
        "startup_bytes": float(startup),
        "param_bytes": reports[0]["param_bytes"],
    }


# ---------------------------------------------------------------------------- report


def report(args: argparse.Namespace, setup: c.Setup, results: list[dict], init_loss: float) -> str:
    base = next((r for r in results if r["method"] == "single"), None)
    ddp = next((r for r in results if r["method"] == "ddp"), None)

    def ratio(x: float, ref: dict | None, key: str, digits: int = 3) -> str:
        return f"{x / ref[key]:.{digits}f}" if ref and ref[key] else "-"

    rows = [
        [
            r["method"],
            str(r["processes"]),
            str(r["samples"]),
            r["steps"],
            r["rounds"] or "-",
            f"{r['loss']:.4f}",
            ratio(r["loss"], ddp, "loss"),
            ratio(r["loss"], base, "loss"),
            c.fmt_bytes(r["bytes"]) + (" (est.)" if r["method"] == "ddp" else ""),
            ratio(r["bytes"], ddp, "bytes", 4) if r["bytes"] else "-",
            f"{r['wall_s']:.0f}",
            f"{r['fit_s']:.0f}",
        ]
        for r in results
    ]
    headers = [
        "method", "procs", "samples", "steps/proc", "rounds", "val loss", "loss/ddp",
        "loss/single", "network bytes", "bytes/ddp", "wall s", "fit s",
    ]  # fmt: skip
    diloco = (
        f"outer lr {args.outer_lr:g}, momentum {args.outer_momentum:g}"
        if (args.outer_lr is not None and args.outer_momentum is not None)
        else "the coordinator's default outer lr and momentum"
    )
    left_out = sum(r.get("left_out", 0) for r in results)
    startup = [
        f"{r['method'].removeprefix('drift ')} {c.fmt_bytes(r['startup_bytes'])}"
        for r in results
        if "startup_bytes" in r
    ]
    model = next((c.fmt_bytes(r["param_bytes"]) for r in results if "param_bytes" in r), "")
    notes = [
        f"Setup: {setup.describe()}; {args.epochs} epochs; {args.nodes} processes for ddp and "
        f"drift; drift --sync-every {args.sync_every} (H), quorum 1, "
        f"{'overlapped' if args.overlap == 'on' else 'blocking'} rounds, residual in the "
        f"{'weights' if args.residual == 'weights' else 'next change'}; diloco: {diloco}.",
        f"Initial weights: val loss {init_loss:.4f}. Val loss: mean next-byte cross-entropy over "
        "every validation window, computed by the benchmark from each method's saved final "
        "weights (drift: the coordinator's final checkpoint, which every node holds).",
        "samples: training samples over all processes (the same total for every method, up to "
        "DistributedSampler padding); steps/proc: optimizer steps of each process (drift shard "
        "sizes follow each node's measured capability); rounds: the last drift round (round 0 "
        f"is the start-up sync); uploads left out of a round: {left_out}.",
        "network bytes, drift: measured payload, the sum over nodes of the bytes uploaded and "
        "downloaded at every barrier (strategy.history: weights, or compressed changes, "
        "start-up sync included), QUIC framing and control messages not counted. The start-up "
        f"sync's share (the {args.nodes} nodes' first barrier, float32 weights of {model}): "
        + ", ".join(startup)
        + ".",
        "network bytes, ddp: an estimate, not a measurement: trainable parameter bytes x "
        "optimizer steps x 2(n-1)/n sent per process for a ring all-reduce of float32 "
        "gradients, summed over the n processes; the start-up parameter broadcast and gloo "
        "framing are not counted.",
        "wall: from launching the first process (drift: the coordinator) to the last training "
        "process exiting, start-up included; fit: the longest trainer.fit. Both depend on the "
        "machine's load, the ratios above do not.",
    ]
    return c.table(headers, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def summary(args: argparse.Namespace, results: list[dict]) -> str:
    """The last line: the best drift method against DDP (see the module docstring)."""
    ddp = next((r for r in results if r["method"] == "ddp"), None)
    drift = [r for r in results if "aggregation" in r]
    if ddp is None or not drift:
        return "convergence: no comparison (run ddp and at least one drift method)"
    cheap = [r for r in drift if r["bytes"] / ddp["bytes"] <= BYTES_TARGET]
    best = min(cheap or drift, key=lambda r: r["loss"])
    return (
        f"convergence: best drift {best['aggregation']} val loss/ddp "
        f"{best['loss'] / ddp['loss']:.3f}, bytes/ddp {best['bytes'] / ddp['bytes']:.4f} "
        f"(nodes {args.nodes}, H {args.sync_every}, {best['dtype']})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    c.Setup.add_args(ap, max_chars=3_500_000)
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps per node, at least")
    ap.add_argument("--epochs", type=int, default=0, help="epochs (instead of --steps)")
    ap.add_argument("--nodes", type=int, default=2, help="processes for ddp and drift")
    ap.add_argument("--sync-every", type=int, default=100, help="drift steps per round (H)")
    ap.add_argument(
        "--overlap",
        choices=("on", "off"),
        default="on",
        help="drift rounds overlapped (the coordinator's default) or blocking",
    )
    ap.add_argument("--outer-lr", type=float, default=None, help="diloco (coordinator default)")
    ap.add_argument(
        "--residual",
        choices=("change", "weights"),
        default="change",
        help="where drift nodes keep their upload residual (the coordinator's --residual)",
    )
    ap.add_argument("--outer-momentum", type=float, default=None, help="diloco (ditto)")
    ap.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated: single, ddp, mean, diloco, mean-int8, diloco-bfloat16, ...",
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per method")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs' files here")
    ap.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="take single and ddp from an earlier --workdir of the same settings (they are "
        "exactly reproducible; their wall time is then their fit time)",
    )
    ap.add_argument("--update-docs", action="store_true", help="write the table into docs")
    ap.add_argument("--section", default="convergence", help="docs section --update-docs writes")
    # internal: run one training process
    ap.add_argument("--worker", choices=("single", "ddp", "drift"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="node", help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup = c.Setup.from_args(args)
    if args.worker:
        _worker(args, setup)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        try:
            known = m in ("single", "ddp") or drift_method(m) is not None
        except ValueError as exc:
            ap.error(str(exc))
        if not known:
            ap.error(f"unknown method {m!r}: single, ddp, or mean/diloco[-float32|-bfloat16|-int8]")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="drift-convergence-"))
    work.mkdir(parents=True, exist_ok=True)
    c.configure_torch(setup)
    data = c.make_data(setup)
    if not args.epochs:
        per_epoch = len(data.train_dataset) // (args.nodes * setup.batch_size)
        args.epochs = max(1, math.ceil(args.steps / max(1, per_epoch)))
    init_loss = c.evaluate(setup, c.make_model(setup).state_dict(), data)
    results = []
    t0 = time.perf_counter()
    for m in methods:
        print(f"running {m} ...", flush=True)
        if m in ("single", "ddp"):
            res = run_plain(args, setup, m, work / "runs")
        else:
            res = run_drift(args, setup, m, work / "runs")
        res["loss"] = c.evaluate(setup, c.load_weights(res["weights"]), data)
        print(
            f"  {m}: val loss {res['loss']:.4f}, bytes {c.fmt_bytes(res['bytes'])}, "
            f"wall {res['wall_s']:.1f} s, samples {res['samples']}",
            flush=True,
        )
        results.append(res)
    c.conclude(args, report(args, setup, results, init_loss), summary(args, results),
               "all methods", t0, work)  # fmt: skip


if __name__ == "__main__":
    main()
