"""The machine a `srpo-core bench` run is on: CPU model, ISA flags, torch's CPU capability, versions, load average."""

from __future__ import annotations

import datetime
import platform

import torch

from srpo_core.bench.measure import _rss_method_available

# x86 / Arm feature flags that decide which SIMD paths torch, inductor and oneDNN take (the rest of cpuinfo is noise).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")


def cpu_info() -> dict:
    """CPU model, the ISA flags of :data:`ISA_FLAGS` it has, and torch's CPU capability (the SIMD level its own
    kernels dispatch to, e.g. ``AVX2`` or ``AVX512``): the numbers of a CPU run depend on all three."""
    model, flags = platform.processor() or None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and value.strip():
                    model = model if key == "hardware" and model else value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
                if not line.strip() and flags:  # the first processor block is enough
                    break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = None
    return {"cpu_model": model, "cpu_flags": [f for f in ISA_FLAGS if f in flags],
            "torch_cpu_capability": capability}


def environment(device: str) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": device, "machine": platform.machine(), "processor": platform.processor() or None,
           "cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__, **cpu_info()}
    for mod in ("triton", "trl", "cut_cross_entropy", "liger_kernel", "srpo_core"):
        env[mod] = version(mod)
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["memory_method"] = "torch.cuda.max_memory_allocated above the inputs"
    else:
        env["memory_method"] = ("peak RSS above the RSS before the call (VmHWM after clear_refs)"
                                if _rss_method_available() else "torch profiler allocation events")
    env["load_average"] = _load()
    return env


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in __import__("os").getloadavg()]
    except OSError:
        return None
