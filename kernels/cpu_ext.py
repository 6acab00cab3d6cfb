"""The compiled CPU kernel (csrc/segmented_linear.cpp): built once per machine with the local C++ compiler.

The build is cached under RECAST_EXT_DIR (default ~/.cache/recast-serve/ext), keyed by the source, the
torch version and the CPU, so later starts only load it. When no compiler is available the loader says
why once and the torch path falls back to composing weights per distinct task (`load()` returns None).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

from kernels.segments import Segments

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "segmented_linear.cpp"
_lock = threading.Lock()
_state: dict[str, ModuleType | str | None] = {}


def build_dir() -> Path:
    root = Path(os.environ.get("RECAST_EXT_DIR", Path.home() / ".cache" / "recast-serve" / "ext"))
    key = hashlib.sha256(
        SOURCE.read_bytes() + torch.__version__.encode() + platform.machine().encode() + _cpu_flags()
    ).hexdigest()[:16]
    return root / f"segmented_linear-{key}"


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.encode()
    except OSError:
        pass
    return b""


def load() -> ModuleType | None:
    """The compiled module, built on first use; None (with one logged reason) when it cannot be built."""
    with _lock:
        if "module" in _state:
            module = _state["module"]
            return module if isinstance(module, ModuleType) else None
        try:
            from torch.utils.cpp_extension import load as build

            directory = build_dir()
            directory.mkdir(parents=True, exist_ok=True)
            if not any(directory.glob("*.so")):
                log.info("building the compiled CPU kernel (once per machine)", extra={"dir": str(directory)})
            module = build(
                name="recast_segmented_linear",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                verbose=False,
            )
        except Exception as exc:  # no compiler, no ninja, no headers: serve without the fused kernel
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            log.warning(
                "compiled CPU kernel unavailable, composing per task instead", extra={"reason": reason}
            )
            _state["module"], _state["reason"] = None, reason
            return None
        _state["module"] = module
        return module


def unavailable_reason() -> str | None:
    reason = _state.get("reason")
    return reason if isinstance(reason, str) else None


def fused_segmented_linear(
    module: ModuleType,
    x: torch.Tensor,
    segments: Segments,
    templates: torch.Tensor,
    coeffs: torch.Tensor,
    bias: torch.Tensor | None,
    tile: int,
) -> torch.Tensor:
    """y = contract(x, slot, ...) on float32 CPU tensors, with `segments` the layout of slot."""
    xs = segments.gather(x)
    if templates.stride(2) != 1 or templates.stride(1) != templates.shape[2]:
        templates = templates.contiguous()
    empty = torch.empty(0, dtype=torch.float32)
    y = module.segmented_linear(
        xs.contiguous(),
        segments.starts,
        segments.slots,
        templates,
        coeffs.to(torch.float32).contiguous(),
        empty if bias is None else bias.contiguous(),
        tile,
    )
    result: torch.Tensor = segments.scatter(y)
    return result


def packed_segmented_linear(
    module: ModuleType,
    x: torch.Tensor,
    segments: Segments,
    packed: torch.Tensor,
    out_features: int,
    coeffs: torch.Tensor,
    bias: torch.Tensor | None,
    nc: int,
    kc: int,
) -> torch.Tensor:
    """The same on templates packed by kernels.packed_templates.pack, through the AVX2 micro-kernel."""
    xs = segments.gather(x)
    empty = torch.empty(0, dtype=torch.float32)
    y = module.segmented_linear_packed(
        xs.contiguous(),
        segments.starts,
        segments.slots,
        packed,
        coeffs.to(torch.float32).contiguous(),
        empty if bias is None else bias.contiguous(),
        out_features,
        nc,
        kc,
    )
    result: torch.Tensor = segments.scatter(y)
    return result
