"""CheckpointStore with real files: atomic writes, manifest, retention, corruption, crashes."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
import torch

from lightning_drift import fsutil
from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.checkpoint import CheckpointStore, atomic_write
from lightning_drift.errors import ConfigError, DriftError


def weights(r: int) -> bytes:
    return to_bytes({"w": torch.full((4,), float(r)), "steps": torch.tensor(r)})


def outer_state(r: int) -> bytes:
    return to_bytes({"w": torch.full((4,), r / 10)})


def write(store: CheckpointStore, r: int, *, outer: bool = False, now: float | None = None):
    return store.write(
        r,
        weights(r),
        outer=outer_state(r) if outer else None,
        epoch=r // 2,
        contributors=[(f"node{r}b", 30.0), (f"node{r}a", 10.0)],
        now=1000.0 + r if now is None else now,
    )


def flip_byte(path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def names(tmp_path) -> set[str]:
    return {p.name for p in tmp_path.iterdir()}


# -- writing --------------------------------------------------------------------------------


def test_write_then_load_round_trips(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path)

    # Execute
    info = write(store, 1, outer=True)
    loaded, data, outer = CheckpointStore(tmp_path).load()

    # Assert
    assert names(tmp_path) == {
        "round-000001.safetensors",
        "round-000001.outer.safetensors",
        "manifest.json",
        "latest",
    }
    assert loaded == info
    assert data == weights(1) and outer == outer_state(1)
    assert torch.equal(from_bytes(data)["w"], torch.full((4,), 1.0))
    assert info.sha256 == hashlib.sha256(weights(1)).hexdigest()
    assert info.outer_sha256 == hashlib.sha256(outer_state(1)).hexdigest()
    assert (tmp_path / "latest").read_text().strip() == "round-000001.safetensors"


def test_manifest_records_round_epoch_contributors_in_order_hashes_and_time(tmp_path):
    store = CheckpointStore(tmp_path)

    write(store, 2, now=1234.5)
    doc = json.loads((tmp_path / "manifest.json").read_text())

    (entry,) = doc["checkpoints"]
    assert entry["round"] == 2 and entry["epoch"] == 1 and entry["time"] == 1234.5
    assert entry["contributors"] == [["node2b", 30.0], ["node2a", 10.0]]
    assert entry["file"] == "round-000002.safetensors"
    assert entry["sha256"] == hashlib.sha256(weights(2)).hexdigest()
    assert entry["outer_file"] is None


def test_extra_is_kept(tmp_path):
    store = CheckpointStore(tmp_path)

    store.write(3, weights(3), outer=None, epoch=0, contributors=[], now=1.0, extra={"k": "v"})

    assert store.latest().extra == {"k": "v"}


def test_keeps_the_last_k_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)

    for r in range(1, 7):
        write(store, r, outer=True)

    assert [c.completed_round for c in store.checkpoints()] == [4, 5, 6]
    kept = {f"round-{r:06d}{s}.safetensors" for r in (4, 5, 6) for s in ("", ".outer")}
    assert names(tmp_path) == kept | {"manifest.json", "latest"}
    assert store.load(4)[1] == weights(4)
    assert store.latest().completed_round == 6


def test_default_keep_is_five(tmp_path):
    store = CheckpointStore(tmp_path)

    for r in range(8):
        write(store, r)

    assert [c.completed_round for c in store.checkpoints()] == [3, 4, 5, 6, 7]


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="keep must be >= 1"):
        CheckpointStore(tmp_path, keep=0)


# -- crashes --------------------------------------------------------------------------------


def test_crash_before_the_manifest_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    # Prepare: rounds 1..3 with keep=3, then a write of round 4 that dies before its manifest
    store = CheckpointStore(tmp_path, keep=3)
    for r in (1, 2, 3):
        write(store, r)

    def crash(_entries):
        raise OSError("power cut")

    monkeypatch.setattr(store, "write_manifest", crash)

    # Execute
    with pytest.raises(OSError, match="power cut"):
        write(store, 4)
    reopened = CheckpointStore(tmp_path, keep=3)

    # Assert: round 4's file exists but is not a checkpoint; nothing old was deleted
    assert (tmp_path / "round-000004.safetensors").exists()
    assert (tmp_path / "round-000001.safetensors").exists()
    assert reopened.latest().completed_round == 3
    info, data, _ = reopened.load()
    assert info.completed_round == 3 and data == weights(3)
    assert (tmp_path / "latest").read_text().strip() == "round-000003.safetensors"
    with pytest.raises(DriftError, match="no checkpoint of round 4"):
        reopened.load(4)


def test_recovery_after_a_crash_rewrites_the_round_and_cleans_up(tmp_path):
    # Prepare: a stray tmp file and a stray (garbage) round file not in the manifest
    store = CheckpointStore(tmp_path, keep=2)
    for r in (1, 2):
        write(store, r)
    (tmp_path / ".completed_round-000003.safetensors.abc123.tmp").write_bytes(b"half a file")
    (tmp_path / "round-000003.safetensors").write_bytes(b"garbage from a crash")
    assert CheckpointStore(tmp_path).latest().completed_round == 2

    # Execute
    write(store, 3)
    write(store, 4)

    # Assert
    assert names(tmp_path) == {
        "round-000003.safetensors",
        "round-000004.safetensors",
        "manifest.json",
        "latest",
    }
    assert store.load(3)[1] == weights(3)


def test_stray_old_file_not_in_the_manifest_is_removed(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    write(store, 5)
    (tmp_path / "round-000001.safetensors").write_bytes(b"orphan")

    write(store, 6)

    assert "round-000001.safetensors" not in names(tmp_path)


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    def fail(*_a):
        raise OSError("disk full")

    monkeypatch.setattr(fsutil.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")

    assert target.read_bytes() == b"old"
    assert names(tmp_path) == {"f.bin"}


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_dir_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    monkeypatch.setattr(fsutil.os, "replace", replace)

    atomic_write(tmp_path / "x", b"data")

    assert events == ["fsync", "rename", "fsync"]


# -- corruption -----------------------------------------------------------------------------


def test_corrupt_newest_checkpoint_is_never_returned(tmp_path, caplog):
    # Prepare
    store = CheckpointStore(tmp_path)
    for r in (1, 2, 3):
        write(store, r, outer=True)
    flip_byte(tmp_path / "round-000003.safetensors")

    # Execute
    with caplog.at_level(logging.WARNING, logger="lightning_drift.checkpoint"):
        latest = store.latest()
        info, data, outer = store.load()

    # Assert
    assert latest.completed_round == 2
    assert info.completed_round == 2 and data == weights(2) and outer == outer_state(2)
    assert "round=3" in caplog.text
    with pytest.raises(DriftError) as exc:
        store.load(3)
    msg = str(exc.value)
    assert "round-000003.safetensors does not match the sha256 in the manifest" in msg
    assert "load(None) falls back" in msg and "restore the file from a backup" in msg


def test_corrupt_outer_state_makes_the_checkpoint_unusable(tmp_path):
    store = CheckpointStore(tmp_path)
    write(store, 1, outer=True)
    write(store, 2, outer=True)
    flip_byte(tmp_path / "round-000002.outer.safetensors", 0)

    assert store.load()[0].completed_round == 1
    with pytest.raises(DriftError, match=r"round-000002\.outer\.safetensors does not match"):
        store.load(2)


def test_missing_file_falls_back(tmp_path):
    store = CheckpointStore(tmp_path)
    write(store, 1)
    write(store, 2)
    (tmp_path / "round-000002.safetensors").unlink()

    assert store.latest().completed_round == 1
    with pytest.raises(DriftError, match="round-000002.safetensors is missing"):
        store.load(2)


def test_truncated_file_falls_back(tmp_path):
    store = CheckpointStore(tmp_path)
    write(store, 1)
    write(store, 2)
    path = tmp_path / "round-000002.safetensors"
    path.write_bytes(path.read_bytes()[:-4])

    assert store.load()[0].completed_round == 1


def test_all_damaged_or_empty_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.latest() is None
    with pytest.raises(DriftError, match="no checkpoint in .* yet"):
        store.load()

    write(store, 1)
    flip_byte(tmp_path / "round-000001.safetensors")

    assert store.latest() is None
    with pytest.raises(DriftError, match="every checkpoint in .* is damaged"):
        store.load()


def test_unreadable_manifest_is_a_clear_error_and_blocks_writes(tmp_path):
    store = CheckpointStore(tmp_path)
    write(store, 1)
    (tmp_path / "manifest.json").write_text("{not json")

    with pytest.raises(DriftError, match="manifest .* is unreadable"):
        store.latest()
    with pytest.raises(DriftError, match="unreadable"):
        write(store, 2)
    assert not (tmp_path / "round-000002.safetensors").exists()


def test_atomic_write_sets_the_mode_before_the_file_has_its_name(tmp_path):
    secret = tmp_path / "node.token"
    atomic_write(secret, b"eyJ", mode=0o600)
    public = tmp_path / "round.safetensors"
    atomic_write(public, b"w")
    assert (secret.stat().st_mode & 0o777, public.stat().st_mode & 0o777) == (0o600, 0o644)


def test_an_outer_state_attached_later_is_checked_and_loaded_like_one_written_at_once(tmp_path):
    # A sharded round's checkpoint is written before the seats' state is fetched; the outer
    # state is attached to it afterwards, and a checkpoint no longer kept takes none.
    store = CheckpointStore(tmp_path, keep=2)
    w = to_bytes({"w": torch.ones(3)})
    outer = to_bytes({"w": torch.full((3,), 2.0)})
    for r in (1, 2):
        store.write(r, w, outer=None, epoch=0, contributors=[("a", 1.0)], now=float(r))
    assert store.load(2)[2] is None
    assert store.attach_outer(2, outer)
    info, blob, got = store.load(2)
    assert got == outer and blob == w
    assert info.outer_sha256 == hashlib.sha256(outer).hexdigest()
    store.write(3, w, outer=None, epoch=0, contributors=[("a", 1.0)], now=3.0)
    store.write(4, w, outer=None, epoch=0, contributors=[("a", 1.0)], now=4.0)
    assert not store.attach_outer(2, outer)  # round 2 is no longer kept
    assert not (tmp_path / "round-000002.outer.safetensors").exists()
