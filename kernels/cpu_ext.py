"""The compiled CPU kernels (csrc/): built once per machine with the local C++ compiler.

Two fused variants live in one module: the AVX2/FMA 6x16 micro-kernel (and BLAS tiles) of
csrc/segmented_linear.cpp, and csrc/brgemm_linear.cpp on oneDNN's BRGEMM, which libtorch JITs for the CPU
it runs on (AVX2, AVX-512, AVX512-BF16, AMX) whatever the build's target flags.

The build is cached under RECAST_EXT_DIR (default ~/.cache/recast-serve/ext), keyed by the source, the
torch version and the target CPU, so later starts only load it: a finished build found there is imported
as it is, without a compiler. When no build is found and none can be made, the loader says why once and
the torch path falls back to composing weights per distinct task (`load()` returns None).

RECAST_EXT_ARCH sets the compiler flags that select the target CPU (default `-march=native`: this CPU).
Container images set a portable target (e.g. `-mavx2 -mfma`) and build once in their builder stage; the
key then holds these flags instead of this CPU's, so the build is found on any machine of that target.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shlex
import threading
from pathlib import Path
from types import ModuleType

import torch

from kernels import cpu_features
from kernels.segments import Segments

log = logging.getLogger(__name__)
SOURCES = (
    Path(__file__).with_name("csrc") / "segmented_linear.cpp",
    Path(__file__).with_name("csrc") / "brgemm_linear.cpp",
)
NAME = "recast_segmented_linear"
NATIVE = "-march=native"
_lock = threading.Lock()
_state: dict[str, ModuleType | str | None] = {}


def arch_flags() -> list[str]:
    """Compiler flags selecting the target CPU: $RECAST_EXT_ARCH, default `-march=native`."""
    return shlex.split(os.environ.get("RECAST_EXT_ARCH", "").strip() or NATIVE)


def build_dir() -> Path:
    root = Path(os.environ.get("RECAST_EXT_DIR", Path.home() / ".cache" / "recast-serve" / "ext"))
    flags = arch_flags()
    target = _cpu_flags() if flags == [NATIVE] else " ".join(flags).encode()
    key = hashlib.sha256(
        b"".join(source.read_bytes() for source in SOURCES)
        + torch.__version__.encode()
        + platform.machine().encode()
        + target
    ).hexdigest()[:16]
    return root / f"segmented_linear-{key}"


def _cpu_flags() -> bytes:
    return cpu_features.flags_line().encode()


def load() -> ModuleType | None:
    """The compiled module, built on first use; None (with one logged reason) when it cannot be built."""
    with _lock:
        if "module" in _state:
            module = _state["module"]
            return module if isinstance(module, ModuleType) else None
        try:
            from torch.utils.cpp_extension import load as build

            directory = build_dir()
            module = _import_built(directory / f"{NAME}.so")
            if module is None:
                directory.mkdir(parents=True, exist_ok=True)
                log.info("building the compiled CPU kernel (once per machine)", extra={"dir": str(directory)})
                module = build(
                    name=NAME,
                    sources=[str(source) for source in SOURCES],
                    extra_cflags=["-O3", *arch_flags(), "-fopenmp"],
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


def _import_built(path: Path) -> ModuleType | None:
    """The finished build at `path`, imported without a compiler; None when absent or not loadable."""
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(NAME, path)
    if spec is None or spec.loader is None:
        return None
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:  # e.g. cut short by a crash mid-build: build it again
        log.warning("cached CPU kernel build not loadable, rebuilding", extra={"reason": str(exc)[:200]})
        return None
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


def brgemm_segmented_linear(
    module: ModuleType,
    x: torch.Tensor,
    segments: Segments,
    packed: torch.Tensor,
    out_features: int,
    coeffs: torch.Tensor,
    bias: torch.Tensor | None,
    nb: int,
    mb: int,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same on BRGEMM, for templates packed by kernels.packed_templates.pack_blocks (x's dtype); the
    optional (S, out) scale and shift are applied to each row by its slot in the kernel's epilogue."""
    xs = segments.gather(x)
    empty = torch.empty(0, dtype=torch.float32)

    def f32(t: torch.Tensor | None) -> torch.Tensor:
        return empty if t is None else t.to(torch.float32).contiguous()

    y = module.brgemm_segmented_linear(
        xs.contiguous(),
        segments.starts.contiguous(),
        segments.slots.contiguous(),
        packed,
        f32(coeffs),
        f32(bias),
        f32(scale),
        f32(shift),
        out_features,
        nb,
        mb,
    )
    result: torch.Tensor = segments.scatter(y)
    return result


_brgemm_runs: dict[torch.dtype, bool] = {}


def brgemm_runs(module: ModuleType, dtype: torch.dtype) -> bool:
    """Whether BRGEMM computes `dtype` on this CPU: one small problem checked against torch, once.

    libtorch refuses some dtypes on some CPUs (bfloat16 VNNI without AVX512-BF16 or AMX, for one); the
    answer is cached per process."""
    if dtype not in _brgemm_runs:
        from kernels.packed_templates import pack_blocks
        from kernels.segments import segments_of

        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, 8, generator=gen).to(dtype)
        templates = torch.randn(2, 6, 8, generator=gen).to(dtype)
        coeffs = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
        slot = torch.tensor([0, 0, 1, 1, 1])
        try:
            packed = pack_blocks(templates, 16, vnni=dtype != torch.float32)
            got = brgemm_segmented_linear(module, x, segments_of(slot), packed, 6, coeffs, None, 16, 16)
            weights = torch.einsum("sn,noi->soi", coeffs, templates.float())[slot]
            want = torch.einsum("ti,toi->to", x.float(), weights)
            ok = bool(torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2))
            if not ok:
                log.warning("BRGEMM disagrees with torch: not used", extra={"dtype": str(dtype)})
        except RuntimeError as exc:
            log.info("BRGEMM unavailable", extra={"dtype": str(dtype), "reason": str(exc).splitlines()[0]})
            ok = False
        _brgemm_runs[dtype] = ok
    return _brgemm_runs[dtype]
