"""Where and in what dtype a model serves, from the settings' words, with a clear error when it cannot.

    resolve_device("auto" | "cpu" | "cuda" | "cuda:N") -> torch.device   (auto: CUDA when available)
    resolve_dtype("auto" | "float32" | "float16" | "bfloat16", device, kernel_path) -> torch.dtype
        auto: bfloat16 on CUDA devices that support it natively, else float16 there; on the CPU bfloat16
        where the CPU has native bf16 (AVX512-BF16 or AMX) and the CPU fast path serves, else float32.
        Measured (benchmarks/dtypes.py, docs/benchmarks.md): bf16 labels agree with fp32 on >= 99.7 % of
        the bundled tasks' held-out texts at 1.7 x the throughput.

A device that cannot be used is a DeviceError naming it, never a silent fall back to the CPU.
"""

from __future__ import annotations

import logging

import torch

from kernels import cpu_features
from recast_core.errors import RecastError

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DeviceError(RecastError):
    """The requested device or dtype cannot serve on this machine."""


def resolve_device(spec: str) -> torch.device:
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = int(spec.partition(":")[2] or 0)
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device found"
            raise DeviceError(f"device {spec}: CUDA is not available ({build}, torch {torch.__version__})")
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(
                f"device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
        return torch.device("cuda", index)
    raise DeviceError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")


def resolve_dtype(spec: str, device: torch.device, kernel_path: str = "torch") -> torch.dtype:
    spec = spec.strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if bf16 else torch.float16
        native = kernel_path == "torch" and cpu_features.bf16_native()
        return torch.bfloat16 if native else torch.float32
    if spec not in DTYPES:
        raise DeviceError(f"dtype {spec!r}: expected auto, {', '.join(DTYPES)}")
    dtype = DTYPES[spec]
    cuda_bf16 = device.type == "cuda" and dtype is torch.bfloat16
    if cuda_bf16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        raise DeviceError(f"dtype bfloat16: {device} ({name}) has no native bfloat16; use float16")
    if device.type == "cpu" and dtype is torch.float16:
        raise DeviceError("dtype float16 on the CPU: not a serving dtype there; use float32 or bfloat16")
    if device.type == "cpu" and dtype is torch.bfloat16 and not cpu_features.bf16_native():
        # Served as asked, but said: measured on an AVX2-only EPYC (docs/benchmarks.md), the plain
        # backbone ran 6.5x slower in bfloat16 than in float32.
        log.warning(
            "dtype bfloat16 on a CPU without AVX512-BF16 or AMX: emulated, several times slower than "
            "float32 here (RECAST_DTYPE=auto picks float32 on this CPU)",
            extra={"cpu_flags": cpu_features.describe()},
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
