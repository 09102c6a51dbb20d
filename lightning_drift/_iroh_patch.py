"""The iroh binding's write-path fix: one memmove instead of a per-byte Python loop.

The generated ``_UniffiRustBufferBuilder.write`` in ``iroh/iroh_ffi.py`` copies every outgoing
byte in a Python loop, which caps a stream near 10 MB/s. :func:`apply` replaces that method
with one ``memmove`` from the argument's buffer (bytes, bytearray, memoryview), guarded:

- it is applied only while the generated method still has the loop (read from its source),
- it is kept only when probes of every buffer kind round-trip through the binding's
  ``lower``/``lift`` unchanged; otherwise the original is restored and a warning logged,
- an iroh version it was not tested on gets a warning (the guards still decide).

``lightning_drift.transport`` calls :func:`apply` once when it is imported and keeps the
status in ``transport.WRITE_PATH``. Set ``DRIFT_IROH_PATCH=0`` in the environment to leave the
binding as it is (status ``"disabled: DRIFT_IROH_PATCH=0"``; transfers then run at the stock
~10 MB/s per stream). Private ctypes function pointers are used, never attributes of
``ctypes.pythonapi``, whose ``argtypes`` other code may set.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import inspect
import logging
import os
import secrets
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

ENV = "DRIFT_IROH_PATCH"  # "0" leaves the binding's write path as it is
TESTED_IROH = ("1.2.0",)


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),  # borrowed by us; PyBuffer_Release drops the reference
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_PyObject_GetBuffer = ctypes.PYFUNCTYPE(
    ctypes.c_int, ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int
)(("PyObject_GetBuffer", ctypes.pythonapi))
_PyBuffer_Release = ctypes.PYFUNCTYPE(None, ctypes.POINTER(_PyBuffer))(
    ("PyBuffer_Release", ctypes.pythonapi)
)
_PyBUF_SIMPLE = 0


@contextlib.contextmanager
def raw_buffer(obj: Any) -> Iterator[tuple[int, int]]:
    """(address, byte length) of a C-contiguous buffer, held for the duration of the block."""
    view = _PyBuffer()
    _PyObject_GetBuffer(obj, ctypes.byref(view), _PyBUF_SIMPLE)  # raises BufferError if not
    try:
        yield (view.buf or 0), view.len
    finally:
        _PyBuffer_Release(ctypes.byref(view))


def _fast_write(self: Any, value: Any) -> None:
    """Drop-in for ``_UniffiRustBufferBuilder.write``: one memmove instead of a byte loop."""
    try:
        cm = raw_buffer(value)
        addr, n = cm.__enter__()
    except (BufferError, TypeError):
        value = bytes(value)  # non-contiguous views: one copy, then the fast path
        cm = raw_buffer(value)
        addr, n = cm.__enter__()
    try:
        with self._reserve(n):
            if n:
                dst = ctypes.cast(self.rbuf.data, ctypes.c_void_p).value + self.rbuf.len
                ctypes.memmove(dst, addr, n)
    finally:
        cm.__exit__(None, None, None)


_PROBES: tuple[Any, ...] = (
    b"",
    b"\x00",
    bytes(range(256)),
    bytearray(b"drift" * 1000),
    memoryview(bytes(range(256)) * 5000)[3:-7],
    secrets.token_bytes(3 << 20),
)


def _round_trip_ok(converter: Any) -> bool:
    for probe in _PROBES:
        expected = bytes(probe)
        if converter.lift(converter.lower(probe)) != expected:
            return False
    return True


def apply(builder: Any = None, converter: Any = None) -> str:
    """Replace the per-byte write loop of the iroh binding with one memmove, if it is safe.

    ``builder``/``converter`` default to the binding's ``_UniffiRustBufferBuilder`` and
    ``_UniffiFfiConverterBytes`` (tests pass stand-ins). Returns ``"patched"``, ``"already"``,
    ``"disabled: DRIFT_IROH_PATCH=0"`` or ``"refused: <reason>"``.
    """
    if os.environ.get(ENV, "").strip() == "0":
        log.info("write_path disabled env=%s=0 throughput='~10 MB/s per stream'", ENV)
        return f"disabled: {ENV}=0"
    import iroh

    ffi = iroh.iroh_ffi
    builder = builder or getattr(ffi, "_UniffiRustBufferBuilder", None)
    converter = converter or getattr(ffi, "_UniffiFfiConverterBytes", None)
    version = iroh_version()
    if builder is None or converter is None:
        return _refuse(f"binding internals not found (iroh {version})")
    original = builder.__dict__.get("write")
    if original is _fast_write:
        return "already"
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return _refuse(f"source of the write method unavailable (iroh {version})")
    if "for i, byte in enumerate(value)" not in source:
        return _refuse(f"write method has no per-byte loop any more (iroh {version})")
    if version not in TESTED_IROH:
        log.warning("write_path untested_iroh_version=%s tested=%s", version, ",".join(TESTED_IROH))
    builder.write = _fast_write
    try:
        ok = _round_trip_ok(converter)
    except Exception as exc:  # any failure of the probe means: do not keep the patch
        ok = False
        log.warning("write_path probe_error=%r", exc)
    if not ok:
        builder.write = original
        return _refuse(f"probe round trip failed (iroh {version}); stock write path kept")
    return "patched"


def _refuse(reason: str) -> str:
    log.warning("write_path not_patched reason=%r throughput='~10 MB/s per stream'", reason)
    return f"refused: {reason}"


def iroh_version() -> str:
    """The installed iroh binding's version, or ``"unknown"``."""
    try:
        return importlib.metadata.version("iroh")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


__all__ = ["ENV", "TESTED_IROH", "apply", "iroh_version", "raw_buffer"]
