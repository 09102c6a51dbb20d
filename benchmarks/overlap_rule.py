"""How should a node fold in a round that arrives while it trains on? Four rules, compared.

With overlapped rounds a node uploads its weights at a barrier and keeps training; the round's
global weights arrive ``delay`` optimizer steps later. This benchmark simulates that in one
process, without a network, so that only the update rule differs: ``--nodes`` workers train
the char-LM of ``benchmarks/_common.py`` on their own shards with their own AdamW, meet every
``--sync-every`` (H) steps, and the global weights are the mean of their uploads (drift's
``--aggregation mean``). Every rule sees the same samples in the same order, and every run
ends with one last blocking round, whose global weights are evaluated.

Rules (``S``: the weights a node uploaded at the barrier, ``G``: the round's global weights,
``W``: the node's weights when ``G`` arrives):

- ``blocking``: the node waits for ``G`` at the barrier and takes it (delay 0; the reference);
- ``rebase`` (drift's): ``W <- G + (W - S)``, the steps taken meanwhile re-based onto ``G``;
- ``mix``: ``W <- a*W + (1 - a)*G`` with ``a = 0.5``, Streaming DiLoCo's merge of a late round;
- ``overwrite``: ``W <- G``, the steps taken meanwhile are dropped.

    python benchmarks/overlap_rule.py                       # delays of H/4, H/2 and 0.9 H
    python benchmarks/overlap_rule.py --steps 600 --sync-every 50 --delays 25

The last line printed is ``overlap_rule: val loss relative to blocking: rebase <a>, mix <b>,
overwrite <c>`` (at the largest delay).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

RULES = ("blocking", "rebase", "mix", "overwrite")


def run(rule: str, delay: int, args: argparse.Namespace, setup: c.Setup, data: Any) -> float:
    """Train ``args.nodes`` simulated nodes with ``rule``; the final global weights' val loss."""
    import torch

    torch.manual_seed(setup.seed)
    models = [c.make_model(setup) for _ in range(args.nodes)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())  # the start-up sync
    opts = [torch.optim.AdamW(m.parameters(), lr=setup.lr) for m in models]
    loaders = [_shard(data, i, args.nodes, setup) for i in range(args.nodes)]
    its = [iter(dl) for dl in loaders]
    h = args.sync_every
    d = 0 if rule == "blocking" else delay
    pending: list[tuple[dict, dict]] | None = None  # per node: (uploaded S, global G)
    arrives_at = -1

    def step(i: int) -> None:
        try:
            x, y = next(its[i])
        except StopIteration:
            its[i] = iter(loaders[i])
            x, y = next(its[i])
        logits = models[i](x)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        )
        opts[i].zero_grad()
        loss.backward()
        opts[i].step()

    def snapshot(m: Any) -> dict:
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    def mean(sds: list[dict]) -> dict:
        return {k: sum(sd[k].double() for sd in sds).div(len(sds)).float() for k in sds[0]}

    def fold(m: Any, taken: dict, g: dict) -> None:
        with torch.no_grad():
            for k, t in m.state_dict().items():
                if rule == "rebase":
                    t.sub_(taken[k]).add_(g[k])
                elif rule == "mix":
                    t.mul_(args.mix).add_(g[k], alpha=1 - args.mix)
                else:  # blocking, overwrite
                    t.copy_(g[k])

    for s in range(1, args.steps + 1):
        for i in range(args.nodes):
            step(i)
        if pending is not None and s == arrives_at:
            for m, (taken, g) in zip(models, pending, strict=True):
                fold(m, taken, g)
            pending = None
        if s % h == 0:
            if pending is not None:  # at most one round in flight: wait for it here
                for m, (taken, g) in zip(models, pending, strict=True):
                    fold(m, taken, g)
            taken = [snapshot(m) for m in models]
            g = mean(taken)
            if d == 0 or s == args.steps:  # blocking, and the session's last round
                for m in models:
                    _load(m, g)
                pending = None
            else:
                pending = [(t, g) for t in taken]
                arrives_at = s + d
    return c.evaluate(setup, dict(models[0].state_dict()), data)


def _load(m: Any, g: dict) -> None:
    import torch

    with torch.no_grad():
        m.load_state_dict(g)


def _shard(data: Any, i: int, n: int, setup: c.Setup) -> Any:
    import torch
    from torch.utils.data import DataLoader, Subset

    ds = data.train_dataset
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(setup.seed))[i::n]
    return DataLoader(Subset(ds, idx.tolist()), batch_size=setup.batch_size, shuffle=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    c.Setup.add_args(ap, d_model=32, n_heads=2, max_chars=600_000)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per node")
    ap.add_argument("--sync-every", type=int, default=40, help="H: steps per round")
    ap.add_argument(
        "--delays", default="", help="steps a round is in flight (default H/4,H/2,0.9H)"
    )
    ap.add_argument("--mix", type=float, default=0.5, help="a of the mix rule")
    ap.add_argument("--rules", default=",".join(RULES))
    args = ap.parse_args()
    setup = c.Setup.from_args(args)
    c.configure_torch(setup)
    h = args.sync_every
    delays = [int(x) for x in args.delays.split(",") if x] or [h // 4, h // 2, int(0.9 * h)]
    if any(not 0 < d < h for d in delays):
        ap.error(f"every delay must be between 1 and H-1 (H = {h}): one round in flight at most")
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    data = c.make_data(setup)
    t0 = time.perf_counter()
    base = run("blocking", 0, args, setup, data)
    rows = [["blocking", "-", f"{base:.4f}", "1.000"]]
    last: dict[str, float] = {}
    for d in delays:
        for rule in rules:
            if rule == "blocking":
                continue
            loss = run(rule, d, args, setup, data)
            rows.append([rule, f"{d} ({d / h:.2f} H)", f"{loss:.4f}", f"{loss / base:.3f}"])
            if d == max(delays):
                last[rule] = loss / base
            print(f"  {rule} delay {d}: val loss {loss:.4f}", flush=True)
    print()
    print(f"```\n{c.command_line()}\n```\n")
    print(c.table(["rule", "round in flight (steps)", "val loss", "/ blocking"], rows))
    print()
    print(
        f"- Setup: {setup.describe()}; {args.nodes} simulated nodes in one process, "
        f"{args.steps} optimizer steps each, H = {h} (rounds of {h} steps), mean aggregation, "
        f"the last round blocking; {time.perf_counter() - t0:.0f} s."
    )
    figs = ", ".join(f"{r} {v:.3f}" for r, v in last.items())
    print(f"\noverlap_rule: val loss relative to blocking: {figs}")


if __name__ == "__main__":
    main()
