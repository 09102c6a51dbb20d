"""End to end: a real coordinator process and three real node processes train the char-LM on
loopback through DriftStrategy and a real Lightning Trainer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from e2e.launch import start_node
from lightning_drift_cli.local import LocalCoordinator
from safetensors.torch import load, load_file

from lightning_drift.scheduler import epoch_permutation

pytestmark = pytest.mark.timeout(420)


def _run_nodes(
    coord: LocalCoordinator,
    tmp: Path,
    n: int,
    epochs: int,
    extra: dict[int, list[str]] | None = None,
) -> list[Path]:
    outs = [tmp / f"node-{i}" for i in range(n)]
    procs = [
        start_node(coord.token, tmp, f"node-{i}", *(extra or {}).get(i, []), epochs=epochs)
        for i in range(n)
    ]
    codes = []
    for i, p in enumerate(procs):
        try:
            codes.append(p.wait(timeout=360))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(
                f"node {i} did not finish; its log:\n{(tmp / f'node-{i}.log').read_text()[-3000:]}"
                f"\ncoordinator:\n{coord.log_tail()}"
            ) from None
    for i, code in enumerate(codes):
        assert code == 0, (
            f"node {i} exited {code}:\n{(tmp / f'node-{i}.log').read_text()[-4000:]}\n"
            f"coordinator:\n{coord.log_tail()}"
        )
    return outs


def test_three_nodes_train_charlm_to_one_checkpoint(tmp_path: Path) -> None:
    epochs = 2
    with LocalCoordinator(
        tmp_path / "coord", min_nodes=3, epochs=epochs, batch_size=16, sync_every=8, quorum=1.0
    ) as coord:
        outs = _run_nodes(coord, tmp_path, 3, epochs)
        assert coord.wait(timeout=60) == 0, coord.log_tail()
    reports = [json.loads((o / "report.json").read_text()) for o in outs]

    # Validation loss of the global model falls from epoch to epoch on every node.
    for r in reports:
        assert len(r["val_losses"]) == epochs, r
        assert r["val_losses"][-1] < r["val_losses"][0], r["val_losses"]

    # Within each epoch what the three nodes trained (their work as the epoch ended, after any
    # re-plan moved samples between them) covers the dataset exactly once.
    n = reports[0]["dataset_size"]
    for epoch in range(epochs):
        worked = [w for r in reports for w in r["worked"] if w["epoch"] == epoch]
        assert len(worked) == 3
        perm = epoch_permutation(worked[0]["seed"], epoch, n)
        covered = torch.cat([perm[a:b] for w in worked for a, b in w["ranges"]])
        assert len(covered) == n
        assert torch.equal(torch.sort(covered).values, torch.arange(n))
        for w in worked:
            assert w["trained"] == sum(b - a for a, b in w["ranges"])

    # Every node ends with exactly the coordinator's final checkpoint.
    manifest = coord.manifest()
    final_path = coord.latest_checkpoint()
    final = load_file(str(final_path))
    for o in outs:
        node_final = load_file(str(o / "final.safetensors"))
        assert node_final.keys() == final.keys()
        for k in final:
            assert torch.equal(node_final[k], final[k]), k

    # The final checkpoint is the samples-weighted mean of the last round's uploads, computed
    # here by hand in the arrival order the manifest records.
    last = max(c["round"] for c in manifest["checkpoints"])
    assert last >= 3, manifest  # several rounds were trained, not just one
    entry = next(c for c in manifest["checkpoints"] if c["round"] == last)
    uploads = {}
    for o, r in zip(outs, reports, strict=True):
        assert r["last_upload_round"] == last
        uploads[r["node_key"]] = (load((o / f"upload-{last:06d}.safetensors").read_bytes()), r)
    contributors = entry["contributors"]
    assert len(contributors) == 3
    for k, ref in final.items():
        if not ref.is_floating_point():
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        total = 0.0
        for node, samples in contributors:
            sd, _ = uploads[node]
            acc += float(samples) * sd[k].to(torch.float64)
            total += float(samples)
        assert torch.equal((acc / total).to(ref.dtype), ref), k


def test_a_straggler_is_left_behind_but_ends_on_the_final_weights(tmp_path: Path) -> None:
    # Quorum 1/2 and a short deadline: the fast node does not wait for the slow one. The slow
    # node's late uploads are answered with the newest global weights; at the end it still
    # fetches the final checkpoint although the session finished without it.
    epochs = 1
    with LocalCoordinator(
        tmp_path / "coord",
        min_nodes=2,
        epochs=epochs,
        batch_size=16,
        sync_every=6,
        quorum=0.5,
        deadline_floor=0.5,
        deadline_margin=1.0,
        keep=1000,  # every round stays in the manifest
    ) as coord:
        # Node 1 pauses 10 s once after round 1; its deadline for round 2 comes from the pace
        # it showed in round 1 (about a round's work, at least 0.5 s), so the other node's
        # arrival completes round 2 without it, however fast or slow this machine is.
        outs = _run_nodes(coord, tmp_path, 2, epochs, extra={1: ["--stall", "10"]})
        assert coord.wait(timeout=120) == 0, coord.log_tail()
    manifest = coord.manifest()
    rounds = {c["round"]: c for c in manifest["checkpoints"]}
    slow = json.loads((outs[1] / "report.json").read_text())
    # Some training round went ahead without the slow node, and it was told so.
    assert any(len(c["contributors"]) == 1 for r, c in rounds.items() if r > 0), manifest
    assert any(not h["contributed"] for h in slow["history"][1:]), slow["history"]
    final = load_file(str(coord.latest_checkpoint()))
    for o in outs:
        node_final = load_file(str(o / "final.safetensors"))
        for k in final:
            assert torch.equal(node_final[k], final[k]), k


@pytest.mark.parametrize(
    ("dtype", "ratio"),
    [
        ("bfloat16", 0.6),
        ("int8", 0.35),
        ("topk", 0.05),
        ("sign", 0.08),
        ("int2", 0.11),
        ("int2 weights", 0.11),
        ("int4", 0.17),
        ("sign/int4 weights", 0.17),  # sign uploads, int4 answers
    ],
)
def test_compressed_changes_both_ways_rebuild_every_round_bit_for_bit(
    tmp_path: Path, dtype: str, ratio: float
) -> None:
    # --transfer-dtype bfloat16 / int8 / topk: after the start-up sync nodes upload their change in
    # that codec, and the coordinator answers with the round's change, encoded the same way
    # with its own error feedback. Every round a node rebuilds must be, byte for byte, the
    # coordinator's checkpoint of that round (each node keeps a copy of every round).
    up, _, down = dtype.split()[0].partition("/")
    with LocalCoordinator(
        tmp_path / "coord",
        min_nodes=2,
        epochs=1,
        batch_size=16,
        sync_every=3,
        quorum=1.0,
        keep=1000,  # every round stays on disk
        transfer_dtype=up,
        download_dtype=down or "same",
        # "weights": the nodes train on from global + their residual between rounds, and
        # still rebuild every round exactly and end on the final checkpoint
        residual=(dtype.split() + ["change"])[1],
    ) as coord:
        extra = {i: ["--round-copies", str(tmp_path / f"copies-{i}")] for i in range(2)}
        outs = _run_nodes(coord, tmp_path, 2, 1, extra=extra)
        assert coord.wait(timeout=60) == 0, coord.log_tail()
    config = json.loads((coord.state_dir / "state.json").read_text())["session"]["config"]
    assert (config["transfer_dtype"], config["residual"]) == (up, (dtype + " change").split()[1])
    assert config["download_dtype"] == (down or "same")
    ckpt = coord.checkpoint_dir
    final = load_file(str(coord.latest_checkpoint()))
    assert all(t.dtype == torch.float32 for t in final.values())
    full = (ckpt / "round-000000.safetensors").stat().st_size
    for i, o in enumerate(outs):
        report = json.loads((o / "report.json").read_text())
        training = [h for h in report["history"] if h["round"] > 0]
        assert len(training) >= 5, report["history"]
        for h in training:
            assert h["payload"] == "delta", h
            assert h["bytes_sent"] < ratio * full and h["bytes_received"] < ratio * full, h
        if down:  # the answers are the richer codec's: larger than the uploads
            assert all(h["bytes_received"] > 1.5 * h["bytes_sent"] for h in training), training
        for h in report["history"]:
            copy = tmp_path / f"copies-{i}" / f"round-{h['round']:06d}.safetensors"
            theirs = ckpt / f"round-{h['round']:06d}.safetensors"
            assert copy.read_bytes() == theirs.read_bytes(), h
        node_final = load_file(str(o / "final.safetensors"))
        for k in final:
            assert torch.equal(node_final[k], final[k]), k


def test_blocking_and_overlapped_nodes_share_a_session_and_end_exact(tmp_path: Path) -> None:
    # --no-overlap: the session's nodes block at every barrier; a node may still overlap on
    # its own (DriftStrategy(overlap=True)). Either way every node ends on the final weights.
    with LocalCoordinator(
        tmp_path / "coord",
        min_nodes=2,
        epochs=1,
        batch_size=16,
        sync_every=6,
        quorum=1.0,
        overlap=False,
    ) as coord:
        outs = _run_nodes(coord, tmp_path, 2, 1, extra={1: ["--overlap", "on"]})
        assert coord.wait(timeout=60) == 0, coord.log_tail()
    blocking, overlapped = (json.loads((o / "report.json").read_text()) for o in outs)
    assert not any(h["overlapped"] for h in blocking["history"])
    training = overlapped["history"][1:]
    assert len(training) >= 3
    # Every training round but the epoch's last was handed off; the last one blocked.
    assert all(h["overlapped"] for h in training[:-1]) and not training[-1]["overlapped"]
    assert all(h["contributed"] for h in training)
    final = load_file(str(coord.latest_checkpoint()))
    for o in outs:
        node_final = load_file(str(o / "final.safetensors"))
        for k in final:
            assert torch.equal(node_final[k], final[k]), k


def test_a_slow_node_is_given_less_work_and_every_sample_is_still_trained_once(
    tmp_path: Path,
) -> None:
    # Node 1 trains ten times slower than its calibration says. The coordinator re-plans the
    # rest of the epoch from measured step times: the fast node takes over part of the slow
    # one's work, and the epoch is still covered exactly once by what the nodes trained.
    # Calibrations on a shared machine are noisy (a node calibrating while the other starts up
    # measures less), so the slow node may be given anything from a fifth of the epoch on:
    # the epoch is large enough that even a fifth takes the slow node longer than the work a
    # re-plan leaves it (what it trains before the next progress report, 5 s and a margin).
    data = ["--max-chars", "240000"]
    with LocalCoordinator(
        tmp_path / "coord", min_nodes=2, epochs=1, batch_size=16, sync_every=3, quorum=1.0
    ) as coord:
        outs = _run_nodes(coord, tmp_path, 2, 1, extra={0: data, 1: [*data, "--slowdown", "10"]})
        assert coord.wait(timeout=60) == 0, coord.log_tail()
    fast, slow = (json.loads((o / "report.json").read_text()) for o in outs)
    worked = [fast["worked"][0], slow["worked"][0]]
    n = fast["dataset_size"]
    covered = sorted(i for w in worked for a, b in w["ranges"] for i in range(a, b))
    assert covered == list(range(n))  # every position of the epoch with exactly one node
    for w in worked:
        assert w["trained"] == sum(b - a for a, b in w["ranges"])  # and trained by it
    assert max(w["revision"] for w in worked) > 0  # re-planned inside the epoch
    assert worked[0]["trained"] > worked[1]["trained"]  # the fast node took over work
    final = load_file(str(coord.latest_checkpoint()))
    for o in outs:
        node_final = load_file(str(o / "final.safetensors"))
        for k in final:
            assert torch.equal(node_final[k], final[k]), k
