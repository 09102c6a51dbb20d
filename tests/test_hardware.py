"""Device probes: parsers fed recorded tool outputs, NVML and torch faked only at their edge."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest
import torch

from lightning_drift import hardware
from lightning_drift.errors import ConfigError
from lightning_drift.protocol import NodeInfo, decode_frame, encode_frame

DATA = Path(__file__).parent / "data" / "hardware"


def recording(name: str) -> str:
    return (DATA / name).read_text()


def fake_nvml(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Answer the real pynvml module's calls with a recorded card's values."""
    cards = json.loads(recording(name))["devices"]
    p = pynvml
    card = cards.__getitem__
    for fn, impl in {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: len(cards),
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetName": lambda h: card(h)["name"],
        "nvmlDeviceGetUUID": lambda h: card(h)["uuid"],
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(**card(h)["memory"]),
        "nvmlDeviceGetCudaComputeCapability": lambda h: tuple(card(h)["cuda_compute_capability"]),
        "nvmlDeviceGetMaxClockInfo": lambda h, t: card(h)["max_clocks_mhz"][
            "sm" if t == p.NVML_CLOCK_SM else "mem"
        ],
    }.items():
        monkeypatch.setattr(p, fn, impl)


def fake_torch_gpus(monkeypatch: pytest.MonkeyPatch, props: list[SimpleNamespace], hip=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.version, "hip", hip)


def no_vulkan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "probe_vulkan", lambda: [])


# ----------------------------------------------------------------------------- parsers


def test_proc_cpuinfo_recorded_on_this_kind_of_host():
    assert hardware.parse_proc_cpuinfo(recording("cpuinfo_amd_epyc_2vcpu.txt")) == ("AMD EPYC", 2)


def test_proc_cpuinfo_without_model_name_gives_none():
    # Some ARM kernels list only "CPU implementer"/"CPU part" per processor.
    text = "processor\t: 0\nBogoMIPS\t: 48.00\nCPU part\t: 0xd0c\n\nprocessor\t: 1\n"
    assert hardware.parse_proc_cpuinfo(text) == (None, 2)


def test_sysctl_apple_m2():
    fields = hardware.parse_sysctl(recording("sysctl_apple_m2.txt"))
    assert fields["machdep.cpu.brand_string"] == "Apple M2"
    assert int(fields["hw.memsize"]) == 16 * 2**30
    assert fields["hw.ncpu"] == "8"


def test_vulkaninfo_nvidia_and_llvmpipe():
    text = recording("vulkaninfo_summary_rtx4090_llvmpipe.txt")
    raw = hardware.parse_vulkaninfo_summary(text)
    assert [d["deviceName"] for d in raw] == [
        "NVIDIA GeForce RTX 4090",
        "llvmpipe (LLVM 17.0.6, 256 bits)",
    ]
    assert raw[0]["deviceType"] == "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU"
    # llvmpipe is a software rasterizer, not a device to report.
    (gpu,) = hardware.vulkan_devices(text)
    assert (gpu.name, gpu.kind, gpu.usable) == ("NVIDIA GeForce RTX 4090", "vulkan", False)


def test_vulkaninfo_without_driver_or_output_reports_nothing():
    assert hardware.vulkan_devices(recording("vulkaninfo_summary_no_driver.txt")) == []
    assert hardware.vulkan_devices("") == []


# ----------------------------------------------------------------------------- probes


def test_nvml_probe_reads_a_recorded_h200(monkeypatch, caplog):
    fake_nvml(monkeypatch, "nvml_h200.json")
    ((info, uuid, clocks),) = hardware.probe_nvml()
    assert info.name == "NVIDIA H200" and info.kind == "cuda" and info.index == 0
    assert (info.vram_total, info.vram_free) == (150754820096, 150192783360)
    assert info.compute_capability == "9.0"
    assert uuid.startswith("GPU-")
    assert (clocks.sm_mhz, clocks.mem_mhz) == (1980, 3201)


def test_nvml_missing_library_or_failing_call_is_skipped(monkeypatch):
    def missing():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", missing)
    assert hardware.probe_nvml() == []

    fake_nvml(monkeypatch, "nvml_rtx4090.json")

    def lost(h):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lost)
    assert hardware.probe_nvml() == []


def test_nvml_card_without_clock_readings_is_still_listed(monkeypatch):
    fake_nvml(monkeypatch, "nvml_rtx4090.json")

    def unsupported(h, t):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMaxClockInfo", unsupported)
    ((info, _, clocks),) = hardware.probe_nvml()
    assert info.name == "NVIDIA GeForce RTX 4090" and info.compute_capability == "8.9"
    assert (clocks.sm_mhz, clocks.mem_mhz) == (0, 0)


def test_this_machine_probe_never_raises_and_ends_with_the_cpu():
    devices = hardware.probe_devices()
    assert devices[-1].kind == "cpu" and devices[-1].usable
    assert devices[-1].name == hardware.host_info()["cpu"]
    accelerators = torch.cuda.is_available() or torch.backends.mps.is_available()
    if not accelerators and not hardware.probe_nvml() and not shutil.which("vulkaninfo"):
        assert [d.kind for d in devices] == ["cpu"]


def test_cuda_seen_by_nvml_and_torch_is_listed_once_with_free_vram(monkeypatch):
    fake_nvml(monkeypatch, "nvml_rtx4090.json")
    card = json.loads(recording("nvml_rtx4090.json"))["devices"][0]
    props = SimpleNamespace(
        name=card["name"],
        total_memory=card["memory"]["total"],
        major=8,
        minor=9,
        uuid=card["uuid"].removeprefix("GPU-"),  # torch prints the uuid without "GPU-"
    )
    fake_torch_gpus(monkeypatch, [props])
    monkeypatch.setattr(hardware.shutil, "which", lambda exe: "/usr/bin/vulkaninfo")
    monkeypatch.setattr(
        hardware, "run_tool", lambda *a: recording("vulkaninfo_summary_rtx4090_llvmpipe.txt")
    )
    devices = hardware.probe_devices()
    assert [(d.kind, d.name, d.usable) for d in devices[:-1]] == [
        ("cuda", "NVIDIA GeForce RTX 4090", True)
    ]
    assert devices[0].vram_free == card["memory"]["free"]
    assert devices[0].compute_capability == "8.9"
    assert devices[-1].kind == "cpu"


def test_nvidia_card_with_cpu_only_torch_is_reported_not_usable(monkeypatch):
    fake_nvml(monkeypatch, "nvml_h200.json")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    no_vulkan(monkeypatch)
    devices = hardware.probe_devices()
    assert [(d.kind, d.usable) for d in devices] == [("cuda", False), ("cpu", True)]
    text = hardware.describe(devices, "cpu")
    assert "NVIDIA H200, 140.4 GiB (139.9 GiB free), cc 9.0, reported only" in text
    assert text.endswith("training on cpu")


def test_rocm_through_torch(monkeypatch):
    props = SimpleNamespace(
        name="AMD Radeon RX 7900 XTX",
        total_memory=25753026560,
        major=11,
        minor=0,
        gcnArchName="gfx1100",
        uuid="",
    )
    fake_torch_gpus(monkeypatch, [props], hip="6.2.41133")
    monkeypatch.setattr(hardware.shutil, "which", lambda exe: "/usr/bin/vulkaninfo")
    monkeypatch.setattr(
        hardware, "run_tool", lambda *a: recording("vulkaninfo_summary_rx7900xtx_radv.txt")
    )
    devices = hardware.probe_devices()
    # The same card through RADV ("... (RADV NAVI31)") is not listed a second time.
    assert [(d.kind, d.name, d.compute_capability) for d in devices[:-1]] == [
        ("rocm", "AMD Radeon RX 7900 XTX", "gfx1100")
    ]


def test_vulkan_only_gpu_is_reported_and_training_falls_back(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware.shutil, "which", lambda exe: "/usr/bin/vulkaninfo")
    monkeypatch.setattr(
        hardware, "run_tool", lambda *a: recording("vulkaninfo_summary_rx7900xtx_radv.txt")
    )
    monkeypatch.setattr(hardware, "probe_nvml", lambda: [])
    devices = hardware.probe_devices()
    assert [(d.kind, d.usable) for d in devices] == [("vulkan", False), ("cpu", True)]
    assert "torch has no Vulkan backend; training falls back" in hardware.describe(devices)


def test_apple_m2_through_sysctl_and_mps(monkeypatch):
    monkeypatch.setattr(hardware, "sys", SimpleNamespace(platform="darwin"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 11453251584)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 2**30)
    monkeypatch.setattr(hardware, "run_tool", lambda *a: recording("sysctl_apple_m2.txt"))
    (gpu,) = hardware.probe_apple()
    assert (gpu.name, gpu.kind, gpu.vram_total) == ("Apple M2", "mps", 11453251584)
    assert gpu.vram_free == 11453251584 - 2**30


def test_a_crashing_probe_is_skipped(monkeypatch):
    def boom():
        raise OSError("driver hung")

    monkeypatch.setattr(hardware, "probe_torch_gpus", boom)
    monkeypatch.setattr(hardware, "probe_vulkan", boom)
    assert hardware.probe_devices()[-1].kind == "cpu"


# ----------------------------------------------------------------------------- choice


def test_choose_device_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert hardware.choose_device() == torch.device("cpu")
    assert hardware.choose_device("CPU") == torch.device("cpu")
    for bad in ("cuda", "cuda:1", "mps", "rocm", "tpu", ""):
        with pytest.raises(ConfigError, match=r"available: cpu \(or 'auto'\)"):
            hardware.choose_device(bad)
    with pytest.raises(ConfigError, match="cannot train on Vulkan"):
        hardware.choose_device("vulkan")


def test_choose_device_with_two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert hardware.choose_device() == torch.device("cuda", 0)
    assert hardware.choose_device("cuda") == torch.device("cuda", 0)
    assert hardware.choose_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="available: cuda:0, cuda:1, cpu"):
        hardware.choose_device("cuda:2")


# ----------------------------------------------------------------------------- measurement


def test_calibrate_cpu_is_positive_and_short():
    start = time.perf_counter()
    gflops = hardware.calibrate("cpu", seconds=0.2)
    assert gflops > 0
    assert time.perf_counter() - start < 3.0


def test_memory_now_cpu():
    used, peak = hardware.memory_now(torch.device("cpu"))
    assert 0 < used <= peak


def test_node_info_fields_make_a_node_info_that_travels():
    fields = hardware.node_info_fields("cpu", seconds=0.05)
    assert fields["train_device"] == "cpu" and fields["calibration"] > 0
    assert fields["torch_version"] == torch.__version__
    info = NodeInfo(nonce="n", dataset_size=10, **fields)
    assert decode_frame(encode_frame(info)) == info
