"""What this machine can train on: device probes, device choice, a calibration benchmark.

I/O room. Every probe swallows its own failure (missing library, no driver, odd output) and
logs it, so a node on any machine gets at least the CPU. The parsing of each tool's raw output
is a pure ``parse_*`` function, tested against recorded outputs in ``tests/data/hardware/``.

Sources, in order: NVIDIA cards through NVML (``pynvml``: name, VRAM total/free, compute
capability, clocks); CUDA and ROCm through torch (the indices training uses); Apple silicon
through ``sysctl`` and ``torch.backends.mps``; Vulkan through ``vulkaninfo --summary``, reported
but never trained on (torch has no Vulkan backend); the CPU, always.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lightning_drift.errors import ConfigError
from lightning_drift.protocol import DeviceInfo
from lightning_drift.units import format_gib

log = logging.getLogger(__name__)
T = TypeVar("T")

_SYSCTL_KEYS = ("machdep.cpu.brand_string", "hw.memsize", "hw.ncpu")


@dataclass(frozen=True)
class Clocks:
    """Maximum clocks of one NVIDIA card in MHz (logged; ``DeviceInfo`` has no room for them)."""

    index: int
    sm_mhz: int
    mem_mhz: int


# ----------------------------------------------------------------------------- pure parsers


def parse_proc_cpuinfo(text: str) -> tuple[str | None, int]:
    """``(model name, logical processors)`` from Linux ``/proc/cpuinfo``; name None if absent."""
    name = None
    count = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            count += 1
        elif key == "model name" and name is None:
            name = value.strip() or None
    return name, count


def parse_sysctl(text: str) -> dict[str, str]:
    """``{key: value}`` from ``sysctl key ...`` output (``key: value`` lines, macOS/BSD)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def parse_vulkaninfo_summary(text: str) -> list[dict[str, str]]:
    """One ``{field: value}`` per ``GPUn:`` block of ``vulkaninfo --summary``; [] if none.

    Only the ``Devices:`` section is read; ``field = value`` lines belong to the last ``GPUn:``.
    """
    devices: list[dict[str, str]] = []
    in_devices = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == "Devices:":
            in_devices = True
        elif in_devices and re.fullmatch(r"GPU\d+:", stripped):
            devices.append({})
        elif in_devices and devices and " = " in stripped:
            key, _, value = stripped.partition(" = ")
            devices[-1][key.strip()] = value.strip()
    return devices


def vulkan_devices(text: str) -> list[DeviceInfo]:
    """Hardware GPUs from ``vulkaninfo --summary`` as ``DeviceInfo(kind="vulkan", usable=False)``.

    Software rasterizers (``PHYSICAL_DEVICE_TYPE_CPU``, e.g. llvmpipe) are left out.
    """
    out = []
    for i, fields in enumerate(parse_vulkaninfo_summary(text)):
        name = fields.get("deviceName", "")
        if not name or fields.get("deviceType", "").endswith("_CPU"):
            continue
        out.append(DeviceInfo(name=name, kind="vulkan", index=i, usable=False))
    return out


def _norm_uuid(uuid: str) -> str:
    # NVML says "GPU-5a3c...", torch says "5a3c..."; both name the same card.
    return uuid.lower().removeprefix("gpu-")


# ----------------------------------------------------------------------------- probes


def _safe(what: str, fn: Callable[[], T], default: T) -> T:
    """Run a probe; on any failure log why and return ``default`` (probes never crash a node)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a probe must not take the node down
        log.info("probe=%s skipped reason=%r", what, exc)
        return default


def run_tool(*argv: str) -> str:
    """A tool's stdout (``sysctl``, ``vulkaninfo``; 10 s at most, "" when it says nothing):
    the probes' one way to run a program, so a recording can stand in for it."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout


def _max_clock(pynvml: Any, handle: Any, clock: int) -> int:
    # Clocks are a nicety: some boards (vGPU, laptops) answer NOT_SUPPORTED; keep the card.
    try:
        return int(pynvml.nvmlDeviceGetMaxClockInfo(handle, clock))
    except pynvml.NVMLError:
        return 0


def probe_nvml() -> list[tuple[DeviceInfo, str, Clocks]]:
    """NVIDIA cards seen by the driver: ``(info, uuid, clocks)`` each; [] without NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("probe=nvml skipped reason=%r", exc)
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            clocks = Clocks(
                index=i,
                sm_mhz=_max_clock(pynvml, h, pynvml.NVML_CLOCK_SM),
                mem_mhz=_max_clock(pynvml, h, pynvml.NVML_CLOCK_MEM),
            )
            info = DeviceInfo(
                name=name.decode() if isinstance(name, bytes) else name,
                kind="cuda",
                vram_total=int(mem.total),
                vram_free=int(mem.free),
                compute_capability=f"{major}.{minor}",
                index=i,
            )
            out.append((info, uuid.decode() if isinstance(uuid, bytes) else uuid, clocks))
    except pynvml.NVMLError as exc:
        log.info("probe=nvml partial reason=%r devices=%d", exc, len(out))
    finally:
        _safe("nvml_shutdown", pynvml.nvmlShutdown, None)
    return out


def probe_torch_gpus() -> list[tuple[DeviceInfo, str]]:
    """CUDA or ROCm devices as torch numbers them: ``(info, uuid)`` each; [] when unavailable."""
    if not torch.cuda.is_available():
        return []
    kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        arch = getattr(p, "gcnArchName", "") if kind == "rocm" else ""
        info = DeviceInfo(
            name=p.name,
            kind=kind,
            vram_total=int(p.total_memory),
            compute_capability=arch or f"{p.major}.{p.minor}",
            index=i,
        )
        out.append((info, str(getattr(p, "uuid", ""))))
    return out


def probe_apple() -> list[DeviceInfo]:
    """The Apple GPU when torch can use MPS (unified memory, shared with the host)."""
    if sys.platform != "darwin" or not torch.backends.mps.is_available():
        return []
    fields = parse_sysctl(run_tool("sysctl", *_SYSCTL_KEYS))
    total = int(fields.get("hw.memsize", 0))
    # Metal caps what one process may allocate below the physical size; prefer that figure.
    total = _safe("mps_max", lambda: int(torch.mps.recommended_max_memory()), total) or total
    used = _safe("mps_used", lambda: int(torch.mps.driver_allocated_memory()), 0)
    name = fields.get("machdep.cpu.brand_string", "Apple GPU")
    return [DeviceInfo(name=name, kind="mps", vram_total=total, vram_free=max(0, total - used))]


def probe_vulkan() -> list[DeviceInfo]:
    """Vulkan GPUs from ``vulkaninfo --summary`` when the tool is installed; [] otherwise."""
    exe = shutil.which("vulkaninfo")
    return vulkan_devices(run_tool(exe, "--summary")) if exe else []


def _total_memory() -> int:
    if sys.platform == "darwin":
        return int(parse_sysctl(run_tool("sysctl", "hw.memsize")).get("hw.memsize", 0))
    if sys.platform == "win32":
        import ctypes

        class _MemStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong)] + [
                (f, ctypes.c_ulonglong)
                for f in ("total", "avail", "pt", "apt", "virt", "avirt", "aext")
            ]

        st = _MemStatus(dwLength=ctypes.sizeof(_MemStatus))
        ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st))  # type: ignore[attr-defined]
        return int(st.total)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def physical_memory() -> int:
    """Bytes of this machine's RAM; 0 when the OS will not say (the failure is logged)."""
    return _safe("memory", _total_memory, 0)


def _cpu_name() -> str:
    if sys.platform == "darwin":
        name = parse_sysctl(run_tool("sysctl", "machdep.cpu.brand_string")).get(
            "machdep.cpu.brand_string"
        )
    elif os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name, _ = parse_proc_cpuinfo(f.read())
    else:
        name = None
    return name or platform.processor() or platform.machine() or "unknown CPU"


def host_info() -> dict:
    """``{"cpu", "cpu_count", "memory" (bytes of RAM), "hostname"}`` of this machine."""
    return {
        "cpu": _safe("cpu_name", _cpu_name, platform.machine() or "unknown CPU"),
        "cpu_count": os.cpu_count() or 1,
        "memory": physical_memory(),
        "hostname": socket.gethostname(),
    }


def probe_devices() -> list[DeviceInfo]:
    """Every compute device of this machine, trainable ones first; the CPU is always last.

    NVIDIA cards that NVML sees but torch cannot use (a CPU-only torch build, or hidden by
    ``CUDA_VISIBLE_DEVICES``) are listed with ``usable=False``; so are Vulkan-only GPUs.
    """
    nvml: list[tuple[DeviceInfo, str, Clocks]] = _safe("nvml", probe_nvml, [])
    gpus: list[tuple[DeviceInfo, str]] = _safe("torch_cuda", probe_torch_gpus, [])
    for _, _, clocks in nvml:
        log.info(
            "nvml_clocks index=%d sm_mhz=%d mem_mhz=%d", clocks.index, clocks.sm_mhz, clocks.mem_mhz
        )
    by_uuid = {_norm_uuid(u): info for info, u, _ in nvml}
    devices: list[DeviceInfo] = []
    for info, uuid in gpus:
        seen = by_uuid.pop(_norm_uuid(uuid), None) if uuid else None
        if seen is not None:  # NVML knows the free memory without creating a CUDA context
            info.vram_free = seen.vram_free
        else:  # no uuid from torch: the same card by name, not to list it twice
            twin = next((k for k, v in by_uuid.items() if v.name == info.name), None)
            by_uuid.pop(twin or "", None)
        devices.append(info)
    for info in by_uuid.values():
        info.usable = False
        devices.append(info)
    devices += _safe("mps", probe_apple, [])
    names = [d.name.lower() for d in devices]
    vulkan: list[DeviceInfo] = _safe("vulkan", probe_vulkan, [])
    for v in vulkan:
        # The same card seen through Vulkan ("AMD Radeon RX 7900 XTX (RADV NAVI31)") is not new.
        if not any(v.name.lower().startswith(n) or n.startswith(v.name.lower()) for n in names):
            devices.append(v)
    host = host_info()
    devices.append(DeviceInfo(name=host["cpu"], kind="cpu", index=0))
    return devices


# ----------------------------------------------------------------------------- choice


def available_devices() -> list[str]:
    """The torch device strings this process can train on, best first (``cpu`` always last)."""
    out = []
    if _safe("cuda", torch.cuda.is_available, False):
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _safe("mps", torch.backends.mps.is_available, False):
        out.append("mps")
    return [*out, "cpu"]


def choose_device(preference: str = "auto") -> torch.device:
    """The device to train on. ``auto``: CUDA/ROCm, else MPS, else CPU.

    An explicit ``"cuda"``, ``"cuda:1"``, ``"rocm"``, ``"mps"`` or ``"cpu"`` is checked:
    ``ConfigError`` names what is available when it is not.
    """
    avail = available_devices()
    pref = preference.strip().lower()
    if pref == "auto":
        return torch.device(avail[0])
    if pref.startswith("rocm") and getattr(torch.version, "hip", None):
        pref = "cuda" + pref[4:]  # ROCm devices are torch "cuda" devices
    try:
        dev = torch.device(pref)
    except (RuntimeError, ValueError):
        dev = None
    if dev is not None and dev.type == "cuda" and dev.index is None and avail[0].startswith("cuda"):
        dev = torch.device("cuda", 0)
    elif dev is not None and dev.type in ("mps", "cpu") and dev.index in (None, 0):
        dev = torch.device(dev.type)
    if dev is None or str(dev) not in avail:
        hint = " (torch cannot train on Vulkan devices)" if "vulkan" in pref else ""
        raise ConfigError(
            f"device {preference!r} is not available on this machine{hint}; "
            f"available: {', '.join(avail)} (or 'auto')"
        )
    return dev


# ----------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def calibrate(device: torch.device | str, seconds: float = 1.0) -> float:
    """Float32 matmul throughput of ``device`` in GFLOP/s, measured for about ``seconds``.

    Call once before joining: the coordinator sizes the first shards from it. Returns 0.0
    (and logs why) if the benchmark cannot run, e.g. out of memory.
    """
    device = torch.device(device)
    n = 512 if device.type == "cpu" else 4096
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device)
        b = torch.randn(n, n, generator=gen).to(device)
        out = torch.empty(n, n, device=device)
        torch.matmul(a, b, out=out)  # warm-up: kernels, allocator, clocks
        _sync(device)
        iters, batch = 0, 1
        start = time.perf_counter()
        while True:
            for _ in range(batch):
                torch.matmul(a, b, out=out)
            _sync(device)
            iters += batch
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
            # Aim the next batch at the time left, growing at most 2x so as not to overshoot.
            batch = max(1, min(iters, int((seconds - elapsed) / (elapsed / iters))))
    except RuntimeError as exc:
        log.warning("calibrate device=%s failed reason=%r", device, exc)
        return 0.0
    gflops = 2.0 * n**3 * iters / elapsed / 1e9
    log.info("calibrate device=%s n=%d iters=%d gflops=%.1f", device, n, iters, gflops)
    return gflops


_mps_peak = 0


def memory_now(device: torch.device | str) -> tuple[int, int]:
    """``(used, peak)`` bytes: torch allocations on CUDA/MPS, process RSS on CPU.

    MPS has no peak counter; the peak is the highest value seen by calls to this function.
    On macOS the CPU figure is the peak RSS for both (no current RSS without extra libraries).
    """
    global _mps_peak
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        used = int(torch.mps.current_allocated_memory())
        _mps_peak = max(_mps_peak, used)
        return used, _mps_peak
    try:
        import resource  # not on Windows
    except ImportError:
        return 0, 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    used = peak
    if os.path.exists("/proc/self/statm"):
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return used, max(peak, used)


# ----------------------------------------------------------------------------- summaries


def node_info_fields(
    device: torch.device | str,
    *,
    devices: list[DeviceInfo] | None = None,
    calibration: float | None = None,
    seconds: float = 1.0,
) -> dict:
    """The hardware part of ``protocol.NodeInfo`` for training on ``device``.

    ``NodeInfo(nonce=..., dataset_size=..., model_fingerprint=..., **node_info_fields(dev))``.
    Probes and calibrates (for ``seconds``) unless ``devices``/``calibration`` are given.
    """
    device = torch.device(device)
    host = host_info()
    return {
        "devices": probe_devices() if devices is None else devices,
        "train_device": str(device),
        "cpu": host["cpu"],
        "cpu_count": host["cpu_count"],
        "memory": host["memory"],
        "calibration": calibrate(device, seconds) if calibration is None else calibration,
        "torch_version": str(torch.__version__),  # a str subclass msgspec cannot encode
        "hostname": host["hostname"],
    }


def describe(devices: list[DeviceInfo], train_device: str | None = None) -> str:
    """One human line per device, then the device training uses (when given)."""
    lines = []
    for d in devices:
        label = d.kind if d.kind in ("cpu", "mps") else f"{d.kind}:{d.index}"
        parts = [f"{label:<9} {d.name}"]
        if d.vram_total:
            free = f" ({format_gib(d.vram_free)} free)" if d.vram_free else ""
            parts.append(f"{format_gib(d.vram_total)}{free}")
        if d.compute_capability:
            parts.append(f"cc {d.compute_capability}")
        if not d.usable:
            why = "torch has no Vulkan backend" if d.kind == "vulkan" else "not usable by torch"
            parts.append(f"reported only, {why}; training falls back to another device")
        lines.append(", ".join(parts))
    if train_device:
        lines.append(f"training on {train_device}")
    return "\n".join(lines)


__all__ = [
    "Clocks",
    "available_devices",
    "calibrate",
    "choose_device",
    "describe",
    "host_info",
    "memory_now",
    "node_info_fields",
    "parse_proc_cpuinfo",
    "parse_sysctl",
    "parse_vulkaninfo_summary",
    "physical_memory",
    "probe_apple",
    "probe_devices",
    "probe_nvml",
    "probe_torch_gpus",
    "probe_vulkan",
    "run_tool",
    "vulkan_devices",
]
