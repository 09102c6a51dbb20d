"""Barrier latency and coordinator CPU with N simulated nodes (many clients per process).

A real coordinator (``drift-coord serve`` in its own process) and N async clients spread
over a few processes, each client with its own iroh endpoint (its own node key), run R
rounds of a small model. For every round:

- **barrier latency** = from the last upload fully sent to the moment every node holds the
  round's BarrierReady and global weights (all on one machine, so ``time.time()`` of the
  client processes is one clock);
- **coordinator CPU per round** = the coordinator process's user+system CPU seconds over the
  R rounds (from /proc), divided by R. Joining and the start-up sync are left out.

Run: ``.venv/bin/python benchmarks/barrier.py [--nodes 8 64 256] [--rounds 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lightning_drift_cli.local import free_udp_port

ROOT = Path(__file__).resolve().parents[1]


def model(params: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    side = max(1, int(params**0.5))
    return {"w": torch.randn(side, side, generator=g), "b": torch.zeros(side)}


def model_bytes(params: int, seed: int) -> bytes:
    from lightning_drift.aggregate import to_bytes

    return to_bytes(model(params, seed))


# ---- client process ---------------------------------------------------------------------


async def clients_main(token: str, count: int, index: int, dataset: int, params: int) -> None:
    from lightning_drift import protocol as p
    from lightning_drift.modelspec import state_fingerprint
    from lightning_drift.node.client import CoordinatorClient

    fingerprint = state_fingerprint(model(params, 0))

    def info() -> p.NodeInfo:
        return p.NodeInfo(
            nonce="", devices=[], train_device="cpu", cpu="bench", cpu_count=1, memory=1,
            calibration=10.0, torch_version="2", dataset_size=dataset,
            model_fingerprint=fingerprint,
        )  # fmt: skip

    # Before connecting: importing torch blocks the loop for seconds (no heartbeats then).
    blob = model_bytes(params, 0)
    sem = asyncio.Semaphore(8)  # do not start hundreds of handshakes at once

    async def connect(i: int):
        async with sem:
            for attempt in range(10):
                try:
                    return await CoordinatorClient.connect(
                        token, node_info=info, name=f"p{index}-{i}", timeout=30, silence_s=300
                    )
                except Exception:
                    if attempt == 9:
                        raise
                    await asyncio.sleep(0.5)

    clients = await asyncio.gather(*(connect(i) for i in range(count)))
    await asyncio.gather(*(c.barrier(p.BarrierSync(round=0), blob) for c in clients))
    shards = await asyncio.gather(*(c.shard(0) for c in clients))
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"

    async def one(c, shard) -> list[dict]:
        out = []
        for k in range(shard.rounds):
            rnd = shard.first_round + k
            stream = await c.conn.open_stream()
            await stream.send(p.BarrierSync(round=rnd, samples=10))
            await stream.send_blob(blob)
            sent = time.time()
            ready = p.expect(await stream.recv(), p.BarrierReady)
            await stream.recv_blob()
            out.append({"round": ready.round, "sent": sent, "done": time.time()})
        return out

    results = await asyncio.gather(*(one(c, s) for c, s in zip(clients, shards, strict=True)))
    print(json.dumps({"rounds": [r for rs in results for r in rs]}), flush=True)
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# ---- driver -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def run_one(n: int, rounds: int, procs: int, params: int) -> dict:
    dataset = n * 100 * rounds  # batch 10 × sync_every 10 × n nodes × rounds
    with tempfile.TemporaryDirectory() as tmp:
        coord = subprocess.Popen(
            [sys.executable, "-m", "lightning_drift_cli.coord", "serve",
             "--state-dir", tmp, "--port", str(free_udp_port()), "--min-nodes", str(n),
             "--dataset-size", str(dataset), "--batch-size", "10", "--sync-every", "10",
             "--heartbeat-timeout", "120", "--epochs", "1",
             "--max-nodes", str(n), "--max-nodes-per-token", str(n), *(["-v"] if os.environ.get("DRIFT_BENCH_LOG") else [])],
            stdout=subprocess.PIPE, stderr=open(os.environ.get("DRIFT_BENCH_LOG", os.devnull), "w"), text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            while not coord.stdout.readline().startswith("node token"):
                pass
            token = coord.stdout.readline().strip()
            # Keep draining the status lines: a full pipe would block the coordinator.
            threading.Thread(target=coord.stdout.read, daemon=True).start()
            procs = max(1, min(procs, n))
            sizes = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
            workers = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "clients",
                        token,
                        str(size),
                        str(i),
                        str(dataset),
                        str(params),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )  # fmt: skip
                for i, size in enumerate(sizes)
            ]
            t0 = time.time()
            for w in workers:
                assert json.loads(w.stdout.readline())["ready"]
            join_s = time.time() - t0
            cpu0 = cpu_seconds(coord.pid)
            for w in workers:
                w.stdin.write("go\n")
                w.stdin.flush()
            records = []
            for w in workers:
                records += json.loads(w.stdout.readline())["rounds"]
            cpu1 = cpu_seconds(coord.pid)
            for w in workers:
                w.wait(60)
        finally:
            coord.kill()
            coord.wait()
    by_round: dict[int, list[dict]] = {}
    for r in records:
        by_round.setdefault(r["round"], []).append(r)
    lat = [max(r["done"] for r in rs) - max(r["sent"] for r in rs) for rs in by_round.values()]
    return {
        "nodes": n,
        "rounds": len(by_round),
        "processes": procs,
        "join_s": join_s,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * pct(lat, 0.99),
        "cpu_s_per_round": (cpu1 - cpu0) / max(1, len(by_round)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--processes", type=int, default=4, help="client processes")
    ap.add_argument("--params", type=int, default=16384, help="float32 weights of the model")
    a = ap.parse_args()
    size = len(model_bytes(a.params, 0))
    print(f"model: {size} bytes of safetensors; {a.rounds} rounds; {a.processes} client procs")
    print(f"{'nodes':>6} {'p50 ms':>9} {'p99 ms':>9} {'coord CPU s/round':>18} {'join s':>7}")
    for n in a.nodes:
        r = run_one(n, a.rounds, a.processes, a.params)
        print(
            f"{r['nodes']:>6} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} "
            f"{r['cpu_s_per_round']:>18.3f} {r['join_s']:>7.1f}",
            flush=True,
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "clients":
        tok, cnt, idx, ds, prm = sys.argv[2:7]
        asyncio.run(clients_main(tok, int(cnt), int(idx), int(ds), int(prm)))
    else:
        main()
