"""What this CPU reports: model name and the vector/matrix extensions the CPU variants can use."""

from __future__ import annotations

from pathlib import Path

import torch

# the flags that decide which code BRGEMM, MKL and the compose loops run (Linux /proc/cpuinfo names)
RELEVANT = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def _cpuinfo_field(name: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return ""


def flags_line() -> str:
    """The raw `flags` line of the first CPU (empty when /proc/cpuinfo is unreadable)."""
    return _cpuinfo_field("flags")


def model_name() -> str:
    """The model name with its family, model and stepping numbers: one name ("AMD EPYC", say) covers
    several generations, so the numbers tell which CPU a figure was measured on."""
    name = _cpuinfo_field("model name") or "unknown CPU"
    ids = [
        (label, _cpuinfo_field(field))
        for label, field in (("family", "cpu family"), ("model", "model"), ("stepping", "stepping"))
    ]
    known = " ".join(f"{label} {value}" for label, value in ids if value)
    return f"{name} ({known})" if known else name


def features() -> list[str]:
    """The relevant extensions this CPU reports, in a fixed order."""
    present = set(flags_line().split())
    return [flag for flag in RELEVANT if flag in present]


def bf16_native() -> bool:
    """Whether bfloat16 GEMMs run on native instructions here (AVX512-BF16 or AMX)."""
    present = set(flags_line().split())
    return "avx512_bf16" in present or "amx_bf16" in present


def describe() -> str:
    """One line for benchmark reports: model, extensions and torch's CPU capability."""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model_name()}; {' '.join(features()) or 'no AVX2'}; torch capability {capability}"
