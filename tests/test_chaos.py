"""Chaos: SIGKILL node processes at random moments over many rounds, and the coordinator once.

A real ``drift-coord serve`` and three node processes (this file run as a script). A seeded
driver kills a random node now and then (it is started again with the same key, as a node
restarted from its key file would be) and kills the coordinator once mid-session (started
again on the same state directory). The session must finish, every checkpoint in the manifest
must verify, and every node must end holding exactly the final checkpoint.

Run as a script, this file is one node: ``python tests/test_chaos.py node TOKEN INDEX SECRET
OUT``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("DRIFT_CHAOS_SEED", "424242"))
NODES = 3

pytestmark = pytest.mark.slow


def state(workdir: Path) -> dict:
    try:
        return json.loads((workdir / "state" / "state.json").read_text())["session"]
    except (OSError, ValueError, KeyError):
        return {}


def start_node(token: str, index: int, secret: str, workdir: Path) -> subprocess.Popen:
    log = open(workdir / f"node-{index}.log", "ab")
    return subprocess.Popen(
        [sys.executable, __file__, "node", token, str(index), secret, str(workdir)],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def test_random_sigkills_of_nodes_and_the_coordinator(tmp_path):
    from lightning_drift_cli.local import LocalCoordinator
    from support import verify_checkpoints

    rng = random.Random(SEED)
    print(f"chaos seed {SEED} (DRIFT_CHAOS_SEED to replay)")
    coord = LocalCoordinator(
        tmp_path, min_nodes=NODES, epochs=2, dataset_size=1800, batch_size=10, sync_every=10,
        heartbeat_timeout=3, deadline_floor=2, stay=True,
    )  # fmt: skip
    coord.start()
    secrets = [os.urandom(32).hex() for _ in range(NODES)]
    procs = {i: start_node(coord.token, i, secrets[i], tmp_path) for i in range(NODES)}
    kills: list[str] = []
    killed_at: set[int] = set()
    coordinator_killed = False
    deadline = time.monotonic() + 420
    try:
        while not state(tmp_path).get("finished"):
            assert time.monotonic() < deadline, f"no finish; kills so far: {kills}"
            time.sleep(rng.uniform(0.3, 2.5))
            completed = state(tmp_path).get("completed", 0)
            if not coordinator_killed and completed >= 4 and rng.random() < 0.5:
                coord.kill()
                kills.append(f"coordinator after round {completed}")
                time.sleep(rng.uniform(0.0, 1.0))
                coord.start()
                coordinator_killed = True
            elif completed >= 1 and completed not in killed_at and rng.random() < 0.7:
                killed_at.add(completed)  # at most one node kill per round: over many rounds
                i = rng.randrange(NODES)
                procs[i].send_signal(signal.SIGKILL)
                procs[i].wait(30)
                kills.append(f"node {i} after round {completed}")
                time.sleep(rng.uniform(0.0, 2.0))
                procs[i] = start_node(coord.token, i, secrets[i], tmp_path)
        if not coordinator_killed:  # the session was quicker than the dice: kill it at the end
            coord.kill()
            kills.append("coordinator after the last round")
            coord.start()
        for i, p in procs.items():
            assert p.wait(120) == 0, (i, (tmp_path / f"node-{i}.log").read_text()[-3000:])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        coord.stop()
    print("kills:", kills)
    assert any(k.startswith("coordinator") for k in kills) and any(
        k.startswith("node") for k in kills
    )
    st = state(tmp_path)
    assert st["finished"] and st["completed"] >= 12
    entries = verify_checkpoints(coord.checkpoint_dir)
    final = max(entries, key=lambda e: e["round"])
    assert final["round"] == st["completed"]
    held = {(tmp_path / f"node-{i}.out").read_text().strip() for i in range(NODES)}
    assert held == {final["sha256"]}, "every node ends on exactly the final checkpoint"
    log = coord.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "task.failed" not in log, log[-3000:]


# ---- the node process ------------------------------------------------------------------------


async def node_main(token: str, index: int, secret: bytes, workdir: Path) -> None:
    """An honest node that survives anything: on any connection loss it reconnects with the
    same key and carries on from the global weights it is handed back."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from support import honest_step, node_info, small_fingerprint, small_model

    from lightning_drift.aggregate import from_bytes, to_bytes
    from lightning_drift.errors import DriftError, SessionError, SessionFinished
    from lightning_drift.node.client import CoordinatorClient
    from lightning_drift.protocol import BarrierSync

    held_round = -1
    sha = ""
    end = time.monotonic() + 400
    while time.monotonic() < end:
        client = None
        try:
            client = await CoordinatorClient.connect(
                token,
                node_info=node_info(1800, small_fingerprint()),
                name=f"n{index}",
                timeout=5,
                secret=secret,
                resume_round=held_round,
            )
            ready, blob = await client.barrier(BarrierSync(round=0), to_bytes(small_model()))
            held, held_round, sha = from_bytes(blob), ready.round, ready.sha256
            epoch = ready.epoch
            while not ready.finished:
                a = await client.shard(epoch)
                for r in range(a.first_round, a.first_round + a.rounds):
                    if r <= held_round:
                        continue
                    await asyncio.sleep(0.4)  # training: the kills land inside rounds too
                    ready, blob = await client.barrier(
                        BarrierSync(round=r, epoch=a.epoch, samples=10, train_seconds=0.2),
                        to_bytes(honest_step(held, r, index)),
                    )
                    held, held_round, sha = from_bytes(blob), ready.round, ready.sha256
                    print(f"round {held_round}", flush=True)
                    if ready.finished:
                        break
                epoch = a.epoch + 1
            break
        except SessionFinished:
            # Told the session is over while asking for more work: the final weights come
            # from a start-up sync on a fresh connection.
            held_round = -1
        except SessionError as exc:
            print(f"refused: {exc}", flush=True)
            await asyncio.sleep(0.5)
        except (DriftError, asyncio.TimeoutError, OSError) as exc:
            print(f"lost: {exc!r}", flush=True)
            await asyncio.sleep(0.3)
        finally:
            if client is not None:
                await client.close()
    (workdir / f"node-{index}.out").write_text(sha + "\n")
    print(f"final {sha}", flush=True)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "node":
    tok, idx, sec, wd = sys.argv[2:6]
    asyncio.run(node_main(tok, int(idx), bytes.fromhex(sec), Path(wd)))
