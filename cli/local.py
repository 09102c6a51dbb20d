"""Run a coordinator as a child process on loopback: for the demo, tests and benchmarks.

``LocalCoordinator`` starts ``drift-coord serve`` (``python -m lightning_drift_cli.coord``)
in local mode on a free port with its own state and checkpoint folders, waits for the node
and observer tokens it writes, and can be killed (SIGKILL) and started again on the same
state, which is how restarts are tested. It belongs to the command line, not the library:
the library never starts its own CLI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCoordinator:
    """A ``drift-coord serve`` child process bound to 127.0.0.1."""

    def __init__(self, workdir: Path, *, port: int | None = None, **options: object) -> None:
        self.workdir = Path(workdir)
        self.state_dir = self.workdir / "state"
        self.checkpoint_dir = self.workdir / "checkpoints"
        self.log_path = self.workdir / "coordinator.log"
        self.port = port or free_udp_port()
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.token = ""
        self.observer_token = ""

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "lightning_drift_cli.coord", "serve",
            "--port", str(self.port), "--state-dir", str(self.state_dir),
            "--checkpoint-dir", str(self.checkpoint_dir),
        ]  # fmt: skip
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value is False:
                cmd.append("--no-" + key.replace("_", "-"))
            elif isinstance(value, (list, tuple)):
                for item in value:  # a repeatable flag
                    cmd += [flag, str(item)]
            elif value is not None:
                cmd += [flag, str(value)]
        return cmd

    def start(self, timeout: float = 60.0) -> LocalCoordinator:
        """Start (or start again) and wait until the tokens are written."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        token_file = self.state_dir / "node.token"
        # The server rewrites coordinator.json (its advertised address) on every start, once
        # it is bound; the tokens are written on first start and kept across restarts.
        ready_file = self.state_dir / "coordinator.json"
        before = ready_file.stat().st_mtime_ns if ready_file.exists() else None
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"coordinator exited with {self.proc.returncode}; log:\n{self.log_tail()}"
                )
            if (
                ready_file.exists()
                and ready_file.stat().st_mtime_ns != before
                and token_file.exists()
            ):
                text = token_file.read_text().strip()
                obs = self.state_dir / "observer.token"
                if text and obs.exists() and obs.read_text().strip():
                    self.token = text
                    self.observer_token = obs.read_text().strip()
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"coordinator wrote no token within {timeout:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as a crash would be."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def manifest(self) -> dict:
        return json.loads((self.checkpoint_dir / "manifest.json").read_text())

    def latest_checkpoint(self) -> Path:
        return self.checkpoint_dir / (self.checkpoint_dir / "latest").read_text().strip()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> LocalCoordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
