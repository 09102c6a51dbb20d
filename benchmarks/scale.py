"""How the sharded data plane scales: the coordinator's control plane with a thousand nodes,
and the data plane's bytes with real pieces.

**Control plane** (``--nodes``, default 1,024): a keeper process serves the round books
(``dataplane/books.py``: commits, orders, reports, a signed manifest) over iroh, and the
simulated members run in a few client processes, each member with its own endpoint. Pieces
carry hashes only: each member commits ``--shards`` piece hashes per round (``PieceCommit``),
the two seats of each shard answer their ``ShardOrder`` with the same ``ShardReport``, and
the keeper settles, signs the ``RoundManifest`` and sends it to every member. Measured over
``--rounds`` rounds, after every member joined: the keeper's CPU seconds (from /proc) per
node per round; the control bytes it received and sent per round (frame bytes, counted by the
members) against a ``--model-params`` float32 model; and the p50 of a member's round: from its
commit sent to its manifest received. The keeper stands in for the coordinator's server,
which does not serve these messages yet: it runs the books, signatures and frames the server
will run, and none of the session's other work.

**Data plane** (``--data-nodes``, default 32): ``shardsim.Simulation`` (members on loopback
endpoints, the books in process) with a ``--data-params`` model, int8 changes and
``--data-shards`` shards, DiLoCo's outer step. Each member's change is a fresh random move
of the weights. Per round: the bytes each member pushed as a contributor and fetched as a
receiver of the result, each as a multiple of one encoded change (the most any member
needed), every byte it sent and received in any role (mean), and whether the round's weights
equal the reference star's, fed the same uploads in the same order, byte for byte.

**Faults** (8 members, a 1M-parameter model, 4 shards): a primary killed before it computes,
a mirror that flips one value of its result, and a member that takes the weights whole from
the others chunk by chunk, as a joiner does; each round compared with the reference star.

Run: ``.venv/bin/python benchmarks/scale.py`` (every part; ``--part control``, ``data`` or
``faults`` for one). The last line is the figures in one line.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

BASE = hashlib.sha256(b"the round's base weights").hexdigest()


def table_for(params: int):
    """A model of about ``params`` float32 values in a few large tensors (its tensor table)."""
    import torch

    from lightning_drift.modelspec import TensorSpec

    width = 1024
    rows = max(1, params // (4 * width))
    spec = {f"layer{i}.weight": TensorSpec(torch.float32, (rows, width)) for i in range(4)}
    spec["head.bias"] = TensorSpec(torch.float32, (max(1, params - 4 * rows * width),))
    return spec


# ---- control plane: the keeper -------------------------------------------------------------


async def send_to_all(streams: list, frame: bytes, in_flight: int = 8) -> None:
    """Send one encoded frame on every stream, at most ``in_flight`` writes pending at once.

    A task per member, a thousand at once, cost the keeper more than the writes: setting the
    tasks up, and the garbage collector, which the burst of allocations set off and which
    moved the thousand pending writes to its oldest generation, whose full collections then
    came sooner. The senders share one iterator, so a member slow to take its frame holds up
    one of them while the others go on."""
    todo = iter(streams)

    async def sender() -> None:
        for stream in todo:
            await stream.send_raw(frame)

    await asyncio.gather(*(sender() for _ in range(in_flight)))


async def keeper_main(n: int, shards: int, rounds: int, params: int, out: Path) -> None:
    from lightning_drift import protocol as p
    from lightning_drift.auth import Identity
    from lightning_drift.dataplane import manifest as mf
    from lightning_drift.dataplane.books import Report, RoundBooks
    from lightning_drift.dataplane.plan import ShardPlan
    from lightning_drift.dataplane.reduce import TensorSums
    from lightning_drift.transport import Endpoint

    plan = ShardPlan(table_for(params), "int8", shards)
    identity = Identity.generate()
    ep = await Endpoint.bind()
    out.with_suffix(".addr").write_text(f"{ep.key_hex}@{ep.addrs()[0]}")
    inbox: asyncio.Queue = asyncio.Queue()
    streams: dict[str, object] = {}

    joined: set[str] = set()

    async def serve(conn) -> None:
        stream = await conn.accept_stream()
        node = conn.remote_key.hex()
        streams[node] = stream
        await stream.recv()  # the hello
        joined.add(node)
        while True:
            try:
                await inbox.put((node, await stream.recv()))
            except Exception:
                return

    tasks = []
    while len(joined) < n:
        if len(tasks) < n:
            conn = await ep.accept()
            tasks.append(asyncio.create_task(serve(conn)))
        else:
            await asyncio.sleep(0.05)
    members = sorted(streams)
    start = time.process_time()
    walls = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        books = RoundBooks(
            session="scale", round_no=r, epoch=0, base=BASE, plan=plan, members=members,
            seed=b"seed", report_s=600.0,
        )  # fmt: skip
        while len(books.commits) < n:
            node, msg = await inbox.get()
            commit = mf.Commit(round=msg.round, base=msg.base, pieces=msg.pieces, sizes=msg.sizes)
            why = books.commit(node, commit)
            assert why is None, why
        orders = books.fix(dict.fromkeys(members, 1.0), now=0.0)
        # A shard's seats get the same ShardOrder frame, encoded once by the books.
        await asyncio.gather(*(streams[o.node].send_raw(books.order_frame(o, 0.0)) for o in orders))
        settled = None
        while settled is None:
            node, msg = await inbox.get()
            report = Report(
                msg.shard, msg.result, msg.size, attempt=msg.attempt, norms2=dict(msg.norms2),
                sums={name: TensorSums(m2, r2, bad) for name, m2, r2, bad in msg.sums},
            )  # fmt: skip
            why = books.report(node, report)
            assert why is None, why
            settled, more = books.settle(0.0, 0.0)
            assert not more, "no seat disagrees in this benchmark"
        assert settled.manifest is not None and not settled.manifest.unchanged
        # One frame for every member: encoded once, as the server would.
        frame = p.encode_frame(p.RoundManifest(round=r, blob=mf.sign(settled.manifest, identity)))
        await send_to_all(list(streams.values()), frame)
        walls.append(time.perf_counter() - t0)
    cpu = time.process_time() - start
    out.write_text(json.dumps({"cpu_s": cpu, "rounds": rounds, "walls": walls}))
    await asyncio.sleep(2.0)  # let the last manifests leave before the endpoint closes
    for t in tasks:
        t.cancel()
    await ep.close()


# ---- control plane: the members -------------------------------------------------------------


async def members_main(count: int, addr: str, shards: int, rounds: int, params: int) -> None:
    from lightning_drift import protocol as p
    from lightning_drift.dataplane.manifest import inputs_digest
    from lightning_drift.dataplane.plan import ShardPlan
    from lightning_drift.peers import parse_peer
    from lightning_drift.transport import Endpoint

    plan = ShardPlan(table_for(params), "int8", shards)
    sizes = [s.size for s in plan.shards]
    peer = parse_peer(addr)
    sem = asyncio.Semaphore(16)

    async def join():
        async with sem:
            ep = await Endpoint.bind()
            conn = await ep.dial_peer(peer, timeout=60)
            stream = await conn.open_stream()
            await stream.send(p.StatusRequest())
            return ep, conn, stream

    joined = await asyncio.gather(*(join() for _ in range(count)))
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"

    async def one(ep, stream) -> dict:
        lat, sent, got = [], 0, 0
        me = ep.key_hex
        for r in range(1, rounds + 1):
            pieces = [hashlib.sha256(f"{me} {r} {j}".encode()).hexdigest() for j in range(shards)]
            commit = p.PieceCommit(round=r, base=BASE, pieces=pieces, sizes=sizes)
            t0 = time.time()
            await stream.send(commit)
            sent += len(p.encode_frame(commit))
            while True:
                msg = await stream.recv()
                got += len(p.encode_frame(msg))
                if isinstance(msg, p.ShardOrder):
                    red = list(zip(msg.nodes, msg.weights, msg.pieces, strict=True))
                    result = hashlib.sha256(inputs_digest(red).encode()).hexdigest()
                    report = p.ShardReport(
                        round=r, shard=msg.shard, result=result, size=sizes[msg.shard],
                        norms2=[(n, 1.0) for n in msg.nodes], attempt=msg.attempt,
                        sums=[(s.name, 0.0, 1.0, 0) for s in plan.shards[msg.shard].spans],
                    )  # fmt: skip
                    await stream.send(report)
                    sent += len(p.encode_frame(report))
                elif isinstance(msg, p.RoundManifest):
                    lat.append(time.time() - t0)
                    break
        return {"lat": lat, "sent": sent, "got": got}

    results = await asyncio.gather(*(one(ep, s) for ep, _c, s in joined))
    print(json.dumps({"members": results}), flush=True)
    for ep, conn, _s in joined:
        conn.close()
        await ep.close()


def control_plane(n: int, shards: int, rounds: int, params: int, procs: int) -> dict:
    from _common import child_env

    env = child_env()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "keeper.json"
        keeper = subprocess.Popen(
            [sys.executable, __file__, "keeper", str(n), str(shards), str(rounds), str(params), str(out)],
            env=env, cwd=ROOT,
        )  # fmt: skip
        workers: list[subprocess.Popen] = []
        try:
            deadline = time.monotonic() + 120
            while not out.with_suffix(".addr").exists():
                if time.monotonic() > deadline or keeper.poll() is not None:
                    raise RuntimeError("the keeper did not start")
                time.sleep(0.1)
            addr = out.with_suffix(".addr").read_text()
            sizes = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
            t_join = time.time()
            workers = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "members",
                        str(size),
                        addr,
                        str(shards),
                        str(rounds),
                        str(params),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=ROOT,
                )  # fmt: skip
                for size in sizes
            ]
            for w in workers:
                assert json.loads(w.stdout.readline())["ready"]
            join_s = time.time() - t_join
            for w in workers:
                w.stdin.write("go\n")
                w.stdin.flush()
            members = []
            for w in workers:
                members += json.loads(w.stdout.readline())["members"]
            keeper.wait(120)
            k = json.loads(out.read_text())
        finally:
            for proc in [keeper, *workers]:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    model = 4 * params
    lat = [x for m in members for x in m["lat"]]
    return {
        "nodes": n,
        "shards": shards,
        "rounds": rounds,
        "join_s": join_s,
        "cpu_ms_per_node_round": 1000 * k["cpu_s"] / (n * rounds),
        "bytes_in_per_round": sum(m["sent"] for m in members) / rounds,
        "bytes_out_per_round": sum(m["got"] for m in members) / rounds,
        "bytes_x_model": sum(m["sent"] + m["got"] for m in members) / rounds / model,
        "p50_s": statistics.median(lat),
        "p99_s": sorted(lat)[int(0.99 * (len(lat) - 1))],
    }


# ---- data plane ---------------------------------------------------------------------------------


def _moves(sim, g) -> dict[str, bytes]:
    """Each live member's change: a fresh random move of the global weights."""
    import torch

    return {
        node: sim.change_of(
            node,
            {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in sim.global_sd.items()},
        )
        for node in sim.live
    }


async def faults_async(n: int, shards: int, params: int) -> dict:
    """The three faults on real endpoints: a primary killed before it computes (round 2), a
    mirror that flips one value of its result (round 3), and a member that takes the weights
    whole from the others, chunk by chunk (as a joiner does); each compared with the
    reference star, byte for byte."""
    import torch
    from shardsim import Simulation, flip_one_value

    from lightning_drift.aggregate import to_bytes
    from lightning_drift.dataplane.member import chunk_count
    from lightning_drift.fsutil import sha256_bytes

    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in table_for(params).items()}
    sim = Simulation(sd, shards=shards, codec_name="int8", aggregation="diloco")
    await sim.open(n + 1)
    joiner = sim.members[sim.live[-1]]
    try:
        first = await sim.round(1, _moves(sim, g), dict.fromkeys(sim.live, 1.0))
        primary = next(o.primary for o in joiner.seats if o.primary != joiner.node)
        killed = await sim.round(
            2, _moves(sim, g), dict.fromkeys(sim.live, 1.0), kill_before_compute=[primary]
        )
        liar = next(
            o.mirror
            for o in joiner.seats
            if o.mirror and o.mirror not in sim.killed and o.mirror != joiner.node
        )
        shard = next(i for i, o in enumerate(joiner.seats) if o.mirror == liar)
        lied = await sim.round(
            3, _moves(sim, g), dict.fromkeys(sim.live, 1.0), lies={(liar, shard): flip_one_value}
        )
        blob = to_bytes(sim.global_sd)
        holders = [h for h in sim.live if h != joiner.node]
        tables = [sim.members[h].hold_weights(3, blob, chunk_count(len(blob))) for h in holders]
        before = dict(joiner.client.bytes_in_by_peer)
        got = await joiner.fetch_weights(3, tables[0], holders, sha256_bytes(blob))
        peers = sum(1 for k, b in joiner.client.bytes_in_by_peer.items() if b > before.get(k, 0))
    finally:
        await sim.close()
    return {
        "equal": [first.equal, killed.equal, lied.equal],
        "liar_struck": liar in lied.struck,
        "joiner_equal": got == blob,
        "joiner_peers": peers,
    }


async def data_plane_async(n: int, shards: int, rounds: int, params: int) -> dict:
    import torch
    from shardsim import Simulation

    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in table_for(params).items()}
    sim = Simulation(sd, shards=shards, codec_name="int8", aggregation="diloco")
    await sim.open(n)
    figures = []
    try:
        for r in range(1, rounds + 1):
            payloads = {}
            for node in sim.live:
                move = {
                    k: v + torch.randn(v.shape, generator=g) * 1e-3
                    for k, v in sim.global_sd.items()
                }
                payloads[node] = sim.change_of(node, move)
            weights = {node: 100.0 + i for i, node in enumerate(sorted(payloads))}
            f = await sim.round(r, payloads, weights)
            figures.append(f)
            print(
                f"  data round {r}: {f.seconds:.1f} s, equal to star {f.equal}, upload "
                f"{max(f.pushed.values()) / f.encoded:.3f} x, download "
                f"{max(f.fetched.values()) / f.encoded:.3f} x",
                flush=True,
            )
    finally:
        await sim.close()
    enc = figures[0].encoded
    return {
        "nodes": n,
        "shards": shards,
        "params": params,
        "encoded": enc,
        "upload_x": max(max(f.pushed.values()) for f in figures) / enc,
        "download_x": max(max(f.fetched.values()) for f in figures) / enc,
        "sent_mean_x": statistics.mean(statistics.mean(f.sent.values()) for f in figures) / enc,
        "received_mean_x": statistics.mean(statistics.mean(f.received.values()) for f in figures)
        / enc,
        "sent_max_x": max(max(f.sent.values()) for f in figures) / enc,
        "equal": sum(f.equal for f in figures),
        "rounds": len(figures),
        "round_s": statistics.median(f.seconds for f in figures),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["both", "control", "data", "faults"], default="both")
    ap.add_argument("--nodes", type=int, default=1024, help="control plane: simulated members")
    ap.add_argument("--shards", type=int, default=16, help="control plane: shards")
    ap.add_argument("--rounds", type=int, default=20, help="control plane: rounds")
    ap.add_argument("--processes", type=int, default=4, help="control plane: member processes")
    ap.add_argument("--model-params", type=int, default=10_000_000, help="the model it assumes")
    ap.add_argument("--data-nodes", type=int, default=32)
    ap.add_argument("--data-shards", type=int, default=8)
    ap.add_argument("--data-rounds", type=int, default=3)
    ap.add_argument("--data-params", type=int, default=10_000_000)
    a = ap.parse_args()
    control = data = None
    if a.part in ("both", "control"):
        control = control_plane(a.nodes, a.shards, a.rounds, a.model_params, a.processes)
        print(
            f"control: {control['nodes']} nodes, {control['shards']} shards, {control['rounds']} "
            f"rounds (joined in {control['join_s']:.0f} s): keeper cpu "
            f"{control['cpu_ms_per_node_round']:.3f} ms/node/round, bytes in "
            f"{control['bytes_in_per_round'] / 1e6:.2f} MB + out "
            f"{control['bytes_out_per_round'] / 1e6:.2f} MB per round = "
            f"{control['bytes_x_model']:.3f} x the model's float32, p50 {control['p50_s']:.2f} s, "
            f"p99 {control['p99_s']:.2f} s",
            flush=True,
        )
    if a.part in ("both", "data"):
        data = asyncio.run(
            data_plane_async(a.data_nodes, a.data_shards, a.data_rounds, a.data_params)
        )
        print(
            f"data: {data['nodes']} nodes, {data['params'] / 1e6:.0f}M params, int8 "
            f"({data['encoded'] / 1e6:.2f} MB a change), {data['shards']} shards: a member "
            f"pushed at most {data['upload_x']:.3f} x and fetched at most {data['download_x']:.3f} x "
            f"its change; in every role it sent {data['sent_mean_x']:.2f} x on average (at most "
            f"{data['sent_max_x']:.2f} x) and received {data['received_mean_x']:.2f} x; round "
            f"{data['round_s']:.1f} s; equal to star {data['equal']}/{data['rounds']}",
            flush=True,
        )
    if a.part in ("both", "faults"):
        f = asyncio.run(faults_async(8, 4, 1_000_000))
        print(
            f"faults (8 members, 1M params, 4 shards): rounds equal to star (none, a primary "
            f"killed, a mirror lying) {f['equal']}, the liar struck {f['liar_struck']}; a joiner "
            f"took the weights from {f['joiner_peers']} members, equal {f['joiner_equal']}",
            flush=True,
        )
    c = control or {}
    d = data or {}
    print(
        f"scale: control nodes {c.get('nodes', 0)}, coordinator cpu "
        f"{c.get('cpu_ms_per_node_round', float('nan')):.3f} ms/node/round, coordinator bytes "
        f"{c.get('bytes_x_model', float('nan')):.3f} x model, p50 {c.get('p50_s', float('nan')):.2f} s; "
        f"data nodes {d.get('nodes', 0)}, upload {d.get('upload_x', float('nan')):.3f} x, download "
        f"{d.get('download_x', float('nan')):.3f} x, equal to star {d.get('equal', 0)}/{d.get('rounds', 0)} rounds"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "keeper":
        n_, s_, r_, p_, o_ = sys.argv[2:7]
        asyncio.run(keeper_main(int(n_), int(s_), int(r_), int(p_), Path(o_)))
    elif len(sys.argv) > 1 and sys.argv[1] == "members":
        c_, a_, s_, r_, p_ = sys.argv[2:7]
        asyncio.run(members_main(int(c_), a_, int(s_), int(r_), int(p_)))
    else:
        main()
