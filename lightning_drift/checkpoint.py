"""Coordinated checkpoints on disk: atomic files, a manifest with sha256, retention.

Layout of a checkpoint directory::

    round-000012.safetensors          global weights after round 12
    round-000012.outer.safetensors    DiLoCo momentum buffers (only with an outer optimizer)
    manifest.json                     every kept checkpoint: round, epoch, files, sha256, ...
    latest                            the name of the newest weights file (for people, scripts)

Every file is written to a temporary name in the same directory, fsynced, renamed over its
final name, and the directory is fsynced: a reader sees the old file or the new one, never a
partial one. The manifest is the source of truth: a weights file it does not list (a crash
between writing the file and the manifest) is ignored, and a listed file whose sha256 no
longer matches is never returned. Old checkpoints are deleted only after the manifest that
no longer lists them is durable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_drift.errors import ConfigError, DriftError
from lightning_drift.fsutil import _TMP_SUFFIX, atomic_write, fsync_dir, sha256_bytes, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
_MANIFEST_VERSION = 1
_FILE_RE = re.compile(r"^round-(\d+)(\.outer)?\.safetensors$")


def weights_name(completed_round: int) -> str:
    """The file name of the global weights after ``completed_round`` (round-NNNNNN.safetensors:
    the coordinator's checkpoints, and what a node saves of the weights it holds)."""
    return f"round-{completed_round:06d}.safetensors"


def outer_name(completed_round: int) -> str:
    """The file name of the DiLoCo outer-optimizer state after ``completed_round``."""
    return f"round-{completed_round:06d}.outer.safetensors"


@dataclass
class CheckpointInfo:
    """One checkpoint as listed in the manifest: the global weights after ``completed_round``.
    ``contributors``: ``(node, samples)`` pairs in arrival order."""

    completed_round: int
    epoch: int
    path: Path
    sha256: str
    outer_path: Path | None
    contributors: list[tuple[str, float]]
    time: float
    outer_sha256: str | None = None
    size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_entry(self) -> dict[str, Any]:
        return {
            "round": self.completed_round,  # the manifest's key
            "epoch": self.epoch,
            "file": self.path.name,
            "sha256": self.sha256,
            "size": self.size,
            "outer_file": self.outer_path.name if self.outer_path else None,
            "outer_sha256": self.outer_sha256,
            "contributors": [[node, samples] for node, samples in self.contributors],
            "time": self.time,
            "extra": self.extra,
        }

    @classmethod
    def from_entry(cls, directory: Path, e: dict[str, Any]) -> CheckpointInfo:
        outer = e.get("outer_file")
        return cls(
            completed_round=int(e["round"]),
            epoch=int(e["epoch"]),
            path=directory / str(e["file"]),
            sha256=str(e["sha256"]),
            outer_path=directory / str(outer) if outer else None,
            contributors=[(str(n), s) for n, s in e.get("contributors", [])],
            time=float(e["time"]),
            outer_sha256=e.get("outer_sha256"),
            size=int(e.get("size", 0)),
            extra=dict(e.get("extra") or {}),
        )


class CheckpointStore:
    """The coordinator's checkpoint directory. One writer (the coordinator) at a time.

    Call :meth:`write` after each aggregated round; call :meth:`load` on restart (or
    :meth:`latest` to see what there is). Keeps the newest ``keep`` checkpoints.
    """

    def __init__(self, directory: Path, keep: int = 5) -> None:
        if keep < 1:
            raise ConfigError(f"keep must be >= 1 (checkpoints to retain), got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # writes and outer states attached later take turns

    # -- writing ----------------------------------------------------------------------------

    def write(
        self,
        completed_round: int,
        weights: bytes,
        *,
        outer: bytes | None,
        epoch: int,
        contributors: list[tuple[str, float]],
        now: float,
        extra: dict | None = None,
    ) -> CheckpointInfo:
        """Durably record the global weights after ``completed_round`` (and the outer
        optimizer state).

        Order: weights file, outer file, manifest, ``latest``, then deletion of checkpoints
        beyond ``keep``. A crash at any point leaves the previous checkpoint loadable.
        """
        if completed_round < 0:
            raise ConfigError(f"checkpoint round must be >= 0, got {completed_round}")
        with self._lock:
            entries = self._read_manifest()
            self._remove_tmp_files()  # left by a writer that crashed; only the writer removes them
            path = self.directory / weights_name(completed_round)
            atomic_write(path, weights)
            outer_path = None
            if outer is not None:
                outer_path = self.directory / outer_name(completed_round)
                atomic_write(outer_path, outer)
            info = CheckpointInfo(
                completed_round=completed_round,
                epoch=epoch,
                path=path,
                sha256=sha256_bytes(weights),
                outer_path=outer_path,
                contributors=[(str(n), s) for n, s in contributors],
                time=now,
                outer_sha256=sha256_bytes(outer) if outer is not None else None,
                size=len(weights),
                extra=dict(extra or {}),
            )
            if any(e.completed_round == completed_round for e in entries):
                log.warning("checkpoint.rewrite round=%d path=%s", completed_round, path)
            entries = sorted(
                [e for e in entries if e.completed_round != completed_round] + [info],
                key=lambda e: e.completed_round,
            )
            kept, dropped = entries[-self.keep :], entries[: -self.keep]
            self.write_manifest(kept)
            atomic_write(self.directory / LATEST, (kept[-1].path.name + "\n").encode())
            self._delete(dropped, kept)
            log.info(
                "checkpoint.write round=%d epoch=%d size=%d sha256=%s contributors=%d",
                completed_round,
                epoch,
                len(weights),
                info.sha256[:16],
                len(contributors),
            )
            return info

    def attach_outer(self, completed_round: int, outer: bytes) -> bool:
        """Add the outer state to the checkpoint of ``completed_round`` written without it (a
        sharded round's, whose state the seats hold until it is fetched): outer file, then
        manifest. False when that checkpoint is no longer kept."""
        with self._lock:
            entries = self._read_manifest()
            info = next((e for e in entries if e.completed_round == completed_round), None)
            if info is None:
                return False
            info.outer_path = self.directory / outer_name(completed_round)
            atomic_write(info.outer_path, outer)
            info.outer_sha256 = sha256_bytes(outer)
            self.write_manifest(entries)
            return True

    def write_manifest(self, entries: list[CheckpointInfo]) -> None:
        """Make ``entries`` the checkpoints on disk, atomically: a write is a checkpoint only
        once this has named it (a crash before leaves the previous manifest)."""
        doc = {"version": _MANIFEST_VERSION, "checkpoints": [e.to_entry() for e in entries]}
        atomic_write(
            self.directory / MANIFEST, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
        )

    def _delete(self, dropped: list[CheckpointInfo], kept: list[CheckpointInfo]) -> None:
        """Remove dropped checkpoints and stray files older than the newest kept checkpoint.

        Strays (a file never listed, left by a crash before its manifest) of a round newer than
        the newest checkpoint are left: the next write of that round replaces them.
        """
        keep_names = {e.path.name for e in kept} | {e.outer_path.name for e in kept if e.outer_path}
        newest = kept[-1].completed_round
        doomed = {e.path for e in dropped} | {e.outer_path for e in dropped if e.outer_path}
        for p in self.directory.iterdir():
            m = _FILE_RE.match(p.name)
            if m and p.name not in keep_names and int(m.group(1)) < newest:
                doomed.add(p)
        removed = False
        for p in sorted(doomed):
            try:
                p.unlink()
                removed = True
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("checkpoint.delete_failed path=%s error=%s", p, exc)
        if removed:
            fsync_dir(self.directory)

    def _remove_tmp_files(self) -> None:
        for p in self.directory.glob(f".*{_TMP_SUFFIX}"):
            log.info("checkpoint.remove_tmp path=%s", p)
            with contextlib.suppress(OSError):
                p.unlink()

    # -- reading ----------------------------------------------------------------------------

    def _read_manifest(self) -> list[CheckpointInfo]:
        path = self.directory / MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(raw)
            if doc.get("version") != _MANIFEST_VERSION:
                raise ValueError(f"manifest version {doc.get('version')!r}")
            entries = [CheckpointInfo.from_entry(self.directory, e) for e in doc["checkpoints"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DriftError(
                f"checkpoint manifest {path} is unreadable ({exc}): it was damaged outside "
                "lightning-drift; restore it from a backup or move the directory aside to "
                "start over"
            ) from None
        return sorted(entries, key=lambda e: e.completed_round)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint the manifest lists, oldest first (not verified)."""
        return self._read_manifest()

    def _problem(self, info: CheckpointInfo, data: bytes | None, outer: bytes | None) -> str | None:
        """Why ``info``'s files are not intact, or None. ``data``/``outer``: bytes already read."""
        pairs = [(info.path, info.sha256, data)]
        if info.outer_path is not None:
            pairs.append((info.outer_path, info.outer_sha256 or "", outer))
        for path, expected, content in pairs:
            try:
                found = sha256_bytes(content) if content is not None else sha256_file(path)
            except FileNotFoundError:
                return f"{path} is missing"
            except OSError as exc:
                return f"{path} cannot be read: {exc}"
            if found != expected:
                return (
                    f"{path} does not match the sha256 in the manifest "
                    f"(expected {expected[:16]}..., found {found[:16]}...)"
                )
        return None

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint whose files match their sha256, or None if there is none."""
        for info in reversed(self._read_manifest()):
            problem = self._problem(info, None, None)
            if problem is None:
                return info
            log.warning("checkpoint.corrupt round=%d problem=%r", info.completed_round, problem)
        return None

    def load(
        self, completed_round: int | None = None
    ) -> tuple[CheckpointInfo, bytes, bytes | None]:
        """``(info, weights, outer)`` of the checkpoint of ``completed_round``, or of the
        newest intact one.

        The bytes returned are the bytes whose sha256 was checked. With ``None``, a
        damaged newest checkpoint is skipped (and logged) for the next newest intact one.
        Raises ``DriftError`` when there is none, or when the requested round is missing or
        damaged.
        """
        entries = self._read_manifest()
        if completed_round is not None:
            match = [e for e in entries if e.completed_round == completed_round]
            if not match:
                have = ", ".join(str(e.completed_round) for e in entries) or "none"
                raise DriftError(
                    f"no checkpoint of round {completed_round} in {self.directory} (rounds kept: {have}); "
                    "load one of those, or load(None) for the newest"
                )
            info = match[0]
            data, outer, problem = self._read(info)
            if problem is not None:
                raise DriftError(
                    f"checkpoint of round {completed_round} is damaged: {problem}. It will not be used; "
                    "load(None) falls back to the newest intact checkpoint, or restore the file "
                    "from a backup"
                )
            assert data is not None
            return info, data, outer
        for info in reversed(entries):
            data, outer, problem = self._read(info)
            if problem is None and data is not None:
                return info, data, outer
            log.warning(
                "checkpoint.skip_corrupt round=%d problem=%r", info.completed_round, problem
            )
        if entries:
            raise DriftError(
                f"every checkpoint in {self.directory} is damaged (rounds "
                f"{', '.join(str(e.completed_round) for e in entries)}); restore one from a backup or "
                "start a new session"
            )
        raise DriftError(f"no checkpoint in {self.directory} yet; start a new session")

    def _read(self, info: CheckpointInfo) -> tuple[bytes | None, bytes | None, str | None]:
        try:
            data = info.path.read_bytes()
            outer = info.outer_path.read_bytes() if info.outer_path is not None else None
        except FileNotFoundError as exc:
            return None, None, f"{exc.filename} is missing"
        except OSError as exc:
            return None, None, f"{exc.filename} cannot be read: {exc.strerror}"
        return data, outer, self._problem(info, data, outer)
