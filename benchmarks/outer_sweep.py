"""The outer step's settings, swept: drift's rounds simulated in one process, on the char-LM.

Every node of a drift session trains its shard with its own AdamW and, every ``--sync-every``
steps, its weights meet the others' at the coordinator. This script does exactly that
arithmetic without processes or network, so that many outer-step settings can be compared
on the same data in the time one real run takes:

- each epoch's seeded permutation (``scheduler.epoch_permutation``) is cut into ``--nodes``
  equal shards, and ``scheduler``'s formula gives the epoch's rounds; a node's barriers fall
  where ``node.barriers.barrier_step`` puts them;
- each node is its own copy of the model with its own optimizer, kept across rounds;
- at a barrier the nodes' changes are encoded with ``--codec`` (``lightning_drift.codec``,
  error feedback on every node), accumulated by ``aggregate.Accumulator``, and the outer step
  under test makes the new global weights, which travel back through the same codec with the
  coordinator's own error feedback, exactly as ``coordinator/aggregation.py`` does;
- the final global weights are evaluated with ``_common.evaluate``.

An outer setting is ``mean``, ``diloco:lr=0.7,momentum=0.6[,nesterov=0][,warmup=R]`` (the
outer lr ramped up linearly over the first ``R`` rounds), or ``auto``: the coordinator's own
rule for the round's number of contributors (``aggregate.outer_settings``). ``--nodes``
takes a list (``2,4,8``): every setting runs at every node count, each in its own process
(``--jobs`` at once, niced, the largest first); one table per node count gives the final
validation loss, its ratio to the best of that count, and the loss along the way.

    python benchmarks/outer_sweep.py --nodes 2,4,8 --codec topk --outer auto diloco:lr=1,momentum=0.6
    python benchmarks/outer_sweep.py --grid --steps 1600 --sync-every 100 --update-docs

The last line printed is ``outer_sweep: best <nodes>: <setting> (val loss/auto <r>), ...``
(``/auto`` against ``auto`` where it ran, else against ``mean``, else the first setting).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

GRID_LR = (0.5, 0.7, 1.0)
GRID_MOMENTUM = (0.3, 0.6, 0.9)


def parse_outer(spec: str) -> dict[str, Any]:
    """``mean``, ``auto`` or ``diloco:k=v,...`` as keyword arguments (empty for mean;
    ``{"auto": True}`` for auto; DiLoCo's, and ``warmup``, for diloco)."""
    if spec == "mean":
        return {}
    if spec == "auto":
        return {"auto": True}
    name, _, rest = spec.partition(":")
    if name != "diloco":
        raise SystemExit(f"outer setting {spec!r}: use mean, auto or diloco:lr=..,momentum=..")
    kw: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        k, _, v = part.partition("=")
        if k not in ("lr", "momentum", "nesterov", "warmup"):
            raise SystemExit(f"outer setting {spec!r}: {k!r} is not lr, momentum, nesterov, warmup")
        kw[k] = int(v) if k in ("nesterov", "warmup") else float(v)
    if "nesterov" in kw:
        kw["nesterov"] = bool(kw["nesterov"])
    return kw


def outer_lr(kw: dict[str, Any], contributors: int, round_no: int) -> tuple[float, float]:
    """(outer lr, momentum) of round ``round_no`` (1, 2, ...) with ``contributors``."""
    from lightning_drift import aggregate

    if kw.get("auto"):
        return aggregate.outer_settings(contributors, round_no)
    lr = kw.get("lr", 0.7)
    if kw.get("warmup", 0) > 0:
        lr *= min(1.0, round_no / kw["warmup"])
    return lr, kw.get("momentum", 0.6)


def simulate(args: argparse.Namespace, setup: c.Setup, n_nodes: int, spec: str) -> dict[str, Any]:
    """One simulated session; returns the final val loss and the loss after each epoch."""
    c.configure_torch(setup)
    import torch
    from torch.utils.data import DataLoader, Subset

    from lightning_drift import blocks, codec
    from lightning_drift.aggregate import Accumulator, DiLoCo
    from lightning_drift.node.barriers import barrier_step
    from lightning_drift.scheduler import epoch_permutation

    if args.keep:
        blocks.TOPK_KEEP = args.keep  # Spec.of reads it at every encode
    data = c.make_data(setup)
    train = data.train_dataset
    n_train = len(train)
    epochs = args.epochs or max(1, math.ceil(args.steps * n_nodes * setup.batch_size / n_train))
    rounds = max(1, round(n_train / (setup.batch_size * args.sync_every * n_nodes)))
    kw = parse_outer(spec)
    outer = None
    if kw:
        lr, momentum = outer_lr(kw, n_nodes, 1)
        outer = DiLoCo(lr=lr, momentum=momentum, nesterov=kw.get("nesterov", True))
    done_rounds = 0
    nodes = [c.make_model(setup) for _ in range(n_nodes)]
    opts = [m.configure_optimizers() for m in nodes]
    glob = {k: v.detach().clone() for k, v in nodes[0].state_dict().items()}
    up_res = [codec.Residual() for _ in nodes]
    down_res = codec.Residual()
    curve: list[float] = []
    steps = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = epoch_permutation(setup.seed, epoch, n_train)
        size = n_train // n_nodes
        loaders, totals = [], []
        for i in range(n_nodes):
            stop = (i + 1) * size if i < n_nodes - 1 else n_train
            idx = perm[i * size : stop].tolist()
            loaders.append(iter(DataLoader(Subset(train, idx), batch_size=setup.batch_size)))
            totals.append(math.ceil(len(idx) / setup.batch_size))
        done = [0] * n_nodes
        for k in range(1, rounds + 1):
            acc = Accumulator(glob)
            for i, (m, opt) in enumerate(zip(nodes, opts, strict=True)):
                due = barrier_step(k, totals[i], rounds)
                samples = 0
                m.train()
                while done[i] < due:
                    x, y = next(loaders[i])
                    loss = m.loss((x, y))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    done[i] += 1
                    samples += len(x)
                    steps += 1
                local = {kk: v.detach() for kk, v in m.state_dict().items()}
                if args.codec == "float32":
                    acc.add(str(i), local, samples)
                elif args.residual == "weights":
                    # The node's residual stays in its weights: it trains on from what it
                    # could not send, rather than adding it to its next change.
                    change = codec.difference(local, glob)
                    sent = codec.decode(codec.encode(change, args.codec).payload, glob)
                    up_res[i].load_state_dict({kk: change[kk] - sent[kk] for kk in change})
                    acc.add(str(i), sent, samples, delta=True)
                else:
                    enc = codec.encode(codec.difference(local, glob), args.codec, up_res[i])
                    acc.add(str(i), codec.decode(enc.payload, glob), samples, delta=True)
            target = glob if acc.total_weight <= 0 else acc.mean()
            done_rounds += 1
            if outer is not None and acc.total_weight > 0:
                outer.lr, outer.momentum = outer_lr(kw, len(acc), done_rounds)
                target = outer.step(glob, target)
            down = args.codec if args.download == "same" else args.download
            if down == "float32":
                glob = {kk: v.clone() for kk, v in target.items()}
            else:
                enc = codec.encode(codec.difference(target, glob), down, down_res)
                glob = codec.apply(glob, codec.decode(enc.payload, glob))
            for i, m in enumerate(nodes):
                start = glob
                if args.residual == "weights" and len(up_res[i]):
                    start = codec.apply(glob, up_res[i].state_dict())
                with torch.no_grad():
                    m.load_state_dict(start)
        curve.append(c.evaluate(setup, glob, data))
        print(f"  {n_nodes} nodes {spec}: epoch {epoch} val loss {curve[-1]:.4f}", flush=True)
    return {
        "outer": spec,
        "nodes": n_nodes,
        "loss": curve[-1],
        "curve": curve,
        "epochs": epochs,
        "rounds": rounds * epochs,
        "steps_per_node": steps // n_nodes,
        "seconds": time.perf_counter() - t0,
    }


def grid() -> list[str]:
    specs = ["mean"]
    for lr, mom in itertools.product(GRID_LR, GRID_MOMENTUM):
        specs.append(f"diloco:lr={lr:g},momentum={mom:g}")
    return specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    c.Setup.add_args(ap, max_chars=3_500_000)
    ap.add_argument("--nodes", default="2", help="node counts, comma-separated (2,4,8)")
    ap.add_argument("--sync-every", type=int, default=100, help="steps per round (H)")
    ap.add_argument("--steps", type=int, default=1600, help="optimizer steps per node, at least")
    ap.add_argument("--epochs", type=int, default=0, help="instead of --steps")
    codecs = ("float32", "bfloat16", "int8", "int4", "int3", "int2", "sign", "topk")
    ap.add_argument("--codec", default="int8", choices=codecs)
    ap.add_argument(
        "--download",
        default="same",
        choices=("same", *codecs),
        help="the answers' codec (the coordinator's --download-dtype): same as --codec, or another",
    )
    ap.add_argument(
        "--keep", type=int, default=0, help="topk: values kept of every 64 (0: the codec's)"
    )
    ap.add_argument(
        "--residual",
        choices=("change", "weights"),
        default="change",
        help="a node's upload residual: added to its next change (drift's), or kept in its weights",
    )
    ap.add_argument("--outer", nargs="*", default=None, help="settings to run (see above)")
    ap.add_argument(
        "--grid", action="store_true", help=f"mean and lr {GRID_LR} x momentum {GRID_MOMENTUM}"
    )
    ap.add_argument("--jobs", type=int, default=2, help="settings simulated at once")
    ap.add_argument("--update-docs", action="store_true", help="write the table into docs")
    ap.add_argument("--section", default="outer_sweep", help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup = c.Setup.from_args(args)
    try:
        counts = [int(n) for n in str(args.nodes).split(",") if n.strip()]
    except ValueError:
        ap.error(f"--nodes {args.nodes!r}: give node counts such as 2,4,8")
    if not counts or min(counts) < 1:
        ap.error("--nodes: every node count must be at least 1")
    if args.one:
        c.write_json(Path(args.out), simulate(args, setup, counts[0], args.one))
        return
    specs = list(args.outer or [])
    if args.grid:
        specs += [s for s in grid() if s not in specs]
    if not specs:
        specs = ["mean", "auto"]
    for s in specs:
        parse_outer(s)
    rows = _run_all(args, [(n, s) for n in sorted(counts, reverse=True) for s in specs])
    text, line = report(args, setup, rows)
    print()
    print(text)
    print(f"\n{line}")
    if args.update_docs:
        c.update_docs(args.section, f"```\n{c.command_line()}\n```\n\n{text}\n\n`{line}`")


def _run_all(args: argparse.Namespace, jobs: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Every (node count, setting) simulated in its own niced process, ``--jobs`` at once."""
    work = Path(tempfile.mkdtemp(prefix="drift-outer-"))
    passthrough = [a for a in sys.argv[1:] if a not in ("--grid", "--update-docs")]
    for name in ("--outer", "--jobs", "--nodes"):
        passthrough = _drop_option(passthrough, name)
    pending = list(enumerate(jobs))
    running: list[tuple[int, str, subprocess.Popen[bytes]]] = []
    results: dict[int, dict[str, Any]] = {}
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            i, (n, spec) = pending.pop(0)
            cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), *passthrough,
                   "--nodes", str(n), "--one", spec, "--out", str(work / f"{i}.json")]  # fmt: skip
            running.append((i, spec, subprocess.Popen(cmd, env=c.child_env(), cwd=c.ROOT)))
        time.sleep(1)
        for item in list(running):
            i, spec, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                raise SystemExit(f"{spec} failed (exit {proc.returncode})")
            results[i] = json.loads((work / f"{i}.json").read_text())
    wall = time.perf_counter() - t0
    return [dict(results[i], wall=wall) for i in sorted(results)]


def _drop_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name`` and the values that follow it."""
    out: list[str] = []
    skipping = False
    for a in argv:
        if a == name or a.startswith(name + "="):
            skipping = a == name
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


def report(args: argparse.Namespace, setup: c.Setup, rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(one table per node count, the last line)."""
    headers = ["outer step", "val loss", "loss/best", "loss after each epoch"]
    parts: list[str] = []
    best_of: list[str] = []
    for n in sorted({r["nodes"] for r in rows}):
        mine = sorted((r for r in rows if r["nodes"] == n), key=lambda r: r["loss"])
        best = mine[0]
        body = [
            [
                r["outer"],
                f"{r['loss']:.4f}",
                f"{r['loss'] / best['loss']:.4f}",
                " ".join(f"{x:.3f}" for x in r["curve"]),
            ]
            for r in mine
        ]
        parts.append(
            f"{n} nodes ({best['epochs']} epoch(s), {best['rounds']} rounds, "
            f"{best['steps_per_node']} optimizer steps per node):\n\n" + c.table(headers, body)
        )
        ref = next((r for r in mine if r["outer"] == "auto"), None)
        ref = ref or next((r for r in mine if r["outer"] == "mean"), mine[-1])
        best_of.append(
            f"{n}: {best['outer']} (val loss/{ref['outer'].partition(':')[0]} "
            f"{best['loss'] / ref['loss']:.4f})"
        )
    notes = [
        f"Setup: {setup.describe()}; H={args.sync_every} steps per round, transfer "
        f"{args.codec}{f' keeping {args.keep} of 64' if args.keep else ''}"
        f"{f', answers {args.download}' if args.download != 'same' else ''} (error feedback "
        f"both ways), a node's upload residual in its "
        f"{'weights' if args.residual == 'weights' else 'next change'}; "
        f"{rows[0]['wall'] / 60:.1f} min for all.",
        "diloco: the outer Nesterov SGD step on the pseudo-gradient (global - mean) with lr "
        "and momentum, as `aggregate.DiLoCo` (warmup=R: lr ramped up over the first R rounds); "
        "auto: the coordinator's default, `aggregate.outer_settings` for the round's "
        "contributors; mean: the samples-weighted mean. One run (one seed) per setting.",
    ]
    text = "\n\n".join(parts) + "\n\n" + "\n".join(f"- {x}" for x in notes)
    return text, "outer_sweep: best " + ", ".join(best_of)


if __name__ == "__main__":
    main()
