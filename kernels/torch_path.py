"""The CPU serving path: composed-weight cache for one-task batches, the fused compiled kernel otherwise.

one slot in the batch   -> W = cache[key] (composed once) -> one plain GEMM (F.linear)
several slots, float32  -> compiled fused kernel, per (output tile, segment) compose in cache then multiply:
                           AVX2/FMA micro-kernel on templates packed once (kernels.packed_templates),
                           or BLAS sgemm per tile where the micro-kernel was not compiled in
otherwise               -> compose the distinct slots' weights once, one GEMM per segment
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F

from kernels import cpu_ext
from kernels.packed_templates import PackedTemplateCache
from kernels.reference import compose
from kernels.segments import Segments
from kernels.weight_cache import ComposedWeightCache

ROW_BLOCK = 256  # a segment longer than this is cut so both threads get work
PACKED_CACHE_BYTES = 512 << 20  # packed template copies (the bank's linear templates, once)


def tile_for(in_features: int, budget_bytes: int = 96 << 10) -> int:
    """Output rows per work item: the composed (tile, in) float32 buffer stays within `budget_bytes`."""
    return max(16, min(256, (budget_bytes // (4 * in_features)) // 16 * 16))


def micro_blocks(in_features: int) -> tuple[int, int]:
    """(output columns per work item, k block) for the micro-kernel; measured in benchmarks/kernels.py."""
    return (128, 384) if in_features <= 768 else (128, 768)


class TorchPath:
    def __init__(
        self,
        cache: ComposedWeightCache | None = None,
        use_extension: bool = True,
        use_microkernel: bool = True,
        packed_cache_bytes: int = PACKED_CACHE_BYTES,
    ) -> None:
        self.cache = cache
        self.extension = cpu_ext.load() if use_extension else None
        self.microkernel = (
            use_microkernel and self.extension is not None and bool(self.extension.has_microkernel())
        )
        self.packed = PackedTemplateCache(packed_cache_bytes)

    def linear(
        self,
        x: torch.Tensor,
        segments: Segments,
        templates: torch.Tensor,
        coeffs: torch.Tensor,
        bias: torch.Tensor | None,
        cache_keys: Sequence[Hashable] | None = None,
    ) -> torch.Tensor:
        """The contract for rows laid out as `segments`; cache_keys[s] names slot s's weight (optional)."""
        if segments.count == 0:
            return x.new_empty(x.shape[0], templates.shape[1])
        if segments.count == 1:
            s = int(segments.slots[0])
            weight = self._weight(templates, coeffs, s, cache_keys)
            return F.linear(x, weight, bias)
        if self.extension is not None and x.dtype == torch.float32 and not x.requires_grad:
            if self.microkernel:
                nc, kc = micro_blocks(x.shape[1])
                return cpu_ext.packed_segmented_linear(
                    self.extension,
                    x,
                    segments.split(ROW_BLOCK),
                    self.packed.get(templates),
                    templates.shape[1],
                    coeffs,
                    bias,
                    nc,
                    kc,
                )
            return cpu_ext.fused_segmented_linear(
                self.extension,
                x,
                segments.split(ROW_BLOCK),
                templates,
                coeffs,
                bias,
                tile_for(x.shape[1]),
            )
        return self._composed(x, segments, templates, coeffs, bias)

    def _weight(
        self,
        templates: torch.Tensor,
        coeffs: torch.Tensor,
        s: int,
        cache_keys: Sequence[Hashable] | None,
    ) -> torch.Tensor:
        def make() -> torch.Tensor:
            return compose(templates, coeffs[s : s + 1])[0]

        if self.cache is None or cache_keys is None:
            return make()
        return self.cache.get_or_compose(cache_keys[s], make)

    @staticmethod
    def _composed(
        x: torch.Tensor,
        segments: Segments,
        templates: torch.Tensor,
        coeffs: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        xs = segments.gather(x)
        weights = compose(templates, coeffs.index_select(0, segments.slots))  # (G, out, in)
        lengths = segments.starts[1:] - segments.starts[:-1]
        if bool((lengths == lengths[0]).all()):  # equal runs (e.g. one task per sequence): one bmm
            g, length = segments.count, int(lengths[0])
            y = torch.bmm(xs.view(g, length, -1), weights.transpose(1, 2)).reshape(xs.shape[0], -1)
            if bias is not None:
                y = y + bias
        else:
            parts = [
                F.linear(chunk, w, bias)
                for chunk, w in zip(torch.split(xs, lengths.tolist()), weights, strict=True)
            ]
            y = torch.cat(parts)
        return segments.scatter(y)
