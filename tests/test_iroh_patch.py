"""The iroh binding's write-path fix: applied and guarded (by its probes), or opted out of."""

from __future__ import annotations

import os
import subprocess
import sys

import iroh

from lightning_drift import _iroh_patch, transport


def test_write_path_is_patched_and_round_trips() -> None:
    assert transport.WRITE_PATH == "patched"
    conv = iroh.iroh_ffi._UniffiFfiConverterBytes
    big = os.urandom((3 << 20) + 5)
    for value in (b"", b"x", big, bytearray(big[:1000]), memoryview(big)[7:-3], memoryview(b"")):
        assert conv.lift(conv.lower(value)) == bytes(value)
    # a non-contiguous view goes through a copy, still correct
    strided = memoryview(big[:4000])[::2]
    assert conv.lift(conv.lower(strided)) == bytes(strided)
    assert _iroh_patch.apply() == "already"


class _NoLoopBuilder:
    def write(self, value):  # what a fixed binding would look like
        self.data = bytes(value)


class _LoopBuilder:
    def write(self, value):
        for i, byte in enumerate(value):
            self.data[i] = byte


class _LyingConverter:
    @staticmethod
    def lower(value):
        return bytes(value)

    @staticmethod
    def lift(value):
        return value[:-1]  # loses a byte: the probe must notice


def test_write_path_guard_refuses_without_the_loop() -> None:
    original = _NoLoopBuilder.write
    status = _iroh_patch.apply(_NoLoopBuilder, _LyingConverter)
    assert status.startswith("refused: write method has no per-byte loop")
    assert _NoLoopBuilder.write is original


def test_write_path_guard_restores_on_failed_probe() -> None:
    original = _LoopBuilder.write
    status = _iroh_patch.apply(_LoopBuilder, _LyingConverter)
    assert status.startswith("refused: probe round trip failed")
    assert _LoopBuilder.write is original


def test_the_environment_opts_out_and_leaves_the_binding_stock() -> None:
    code = (
        "import iroh, lightning_drift._iroh_patch as patch, lightning_drift.transport as t; "
        "w = iroh.iroh_ffi._UniffiRustBufferBuilder.__dict__['write']; "
        "print(t.WRITE_PATH, w is patch._fast_write)"
    )
    env = {**os.environ, "DRIFT_IROH_PATCH": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["disabled:", "DRIFT_IROH_PATCH=0", "False"]
