"""`optimum-atb env`: what this machine offers the plugin (versions, backends, device, CPU, threads)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform

import torch

PACKAGES = ("optimum-atb", "torch", "transformers", "accelerate", "optimum", "triton", "torch_npu", "gguf")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
ALLOCATOR_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": model,
        "cores_usable": usable,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": {f: f in flags for f in CPU_FLAGS} if flags else "unknown (/proc/cpuinfo not readable)",
    }


def _devices() -> dict:
    devices = {"cpu": "available"}
    if torch.cuda.is_available():
        devices["cuda"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        devices["cuda"] = "none (torch.cuda.is_available() is False)"
    if _version("torch_npu") == "not installed":
        devices["npu"] = "none (torch_npu is not installed)"
    else:
        try:
            import torch_npu  # noqa: F401  (registers torch.npu)

            devices["npu"] = f"{torch.npu.device_count()} device(s)" if torch.npu.is_available() else "none"
        except Exception as exc:  # a broken CANN install must not break the report
            devices["npu"] = f"torch_npu fails to import: {str(exc).splitlines()[0]}"
    return devices


def collect() -> dict:
    """Everything `optimum-atb env` reports, as a JSON-serialisable dict."""
    import optimum_atb

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "backends": optimum_atb.backend_info(),
        "devices": _devices(),
        "cpu": _cpu(),
        "threads": {
            "torch.get_num_threads": torch.get_num_threads(),
            "torch.get_num_interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        },
        "allocator": {name: os.environ.get(name, "unset") for name in ALLOCATOR_VARS},
    }


def _print_section(title: str, items: dict) -> None:
    print(f"{title}:")
    width = max(map(len, items), default=0)
    for key, value in items.items():
        print(f"  {key:<{width}}  {value}")


def run(as_json: bool = False) -> int:
    """Print the report (Markdown-ish text, or JSON with `as_json`)."""
    info = collect()
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"python    {info['python']} ({info['platform']})")
    _print_section("packages", info["packages"])
    backends = dict(info["backends"])
    selected = backends.pop("selected")["reason"]
    _print_section(
        "backends",
        {
            name: "available" if b["available"] else f"unavailable: {b['reason']}"
            for name, b in backends.items()
        }
        | {"selected": selected},
    )
    _print_section("devices", info["devices"])
    cpu = dict(info["cpu"])
    flags = cpu.pop("flags")
    if isinstance(flags, dict):
        flags = " ".join(f"{f}={'yes' if on else 'no'}" for f, on in flags.items())
    _print_section("cpu", cpu | {"flags": flags})
    _print_section("threads", info["threads"])
    _print_section("allocator", info["allocator"])
    return 0
