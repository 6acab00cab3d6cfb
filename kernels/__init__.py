"""Pure tensor ops for composing task weights from templates. Imports nothing from recast_core or server.

`kernels.reference.segmented_template_linear` is the contract; `Kernels` binds it to one path chosen at
startup (each owner holds its own instance, with its own composed-weight cache); the torch references live
in `kernels.reference`, the Triton kernels in `kernels.triton_kernels` (imported lazily,
triton is optional on CPU hosts).
"""

from kernels.dispatch import KernelPath, Kernels, KernelUnavailable, select_path
from kernels.reference import compose
from kernels.segments import Segments, segments_of
from kernels.weight_cache import ComposedWeightCache

__all__ = [
    "ComposedWeightCache",
    "KernelPath",
    "KernelUnavailable",
    "Kernels",
    "Segments",
    "compose",
    "segments_of",
    "select_path",
]
