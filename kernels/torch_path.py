"""The CPU serving path: cached composed weights for one-task batches, else a variant chosen by measurement.

one slot in the batch  -> W = cache[key] (composed once) -> one plain GEMM (F.linear, the library's)
several slots          -> the fastest of the variants that run for the dtype, measured per kind of call
                          (kernels.variant_choice): shape, dtype, batch rows and run length
    brgemm          fused compose-in-cache + oneDNN BRGEMM, JIT for this CPU (float32, bfloat16)
    microkernel     fused compose-in-L1 + the AVX2/FMA 6x16 micro-kernel (float32)
    sgemm           fused compose-in-cache + BLAS sgemm per tile (float32; only without the micro-kernel)
    template_space  one library GEMM of x against the n stacked templates, then the per-row mix (any dtype)
    composed        compose each distinct slot's weights, one GEMM per run (any dtype; the fallback)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F

from kernels import cpu_ext
from kernels.packed_templates import STACKED, Layout, PackedTemplateCache
from kernels.reference import compose, row_epilogue
from kernels.segments import Segments
from kernels.variant_choice import VariantChooser, forced_variant, kind_of
from kernels.weight_cache import ComposedWeightCache

ROW_BLOCK = 256  # a segment longer than this is cut so both threads get work
PACKED_CACHE_BYTES = 512 << 20  # packed template copies (the bank's linear templates, once per layout)


def tile_for(in_features: int, budget_bytes: int = 96 << 10) -> int:
    """Output rows per work item: the composed (tile, in) float32 buffer stays within `budget_bytes`."""
    return max(16, min(256, (budget_bytes // (4 * in_features)) // 16 * 16))


def micro_blocks(in_features: int) -> tuple[int, int]:
    """(output columns per work item, k block) for the micro-kernel; measured in benchmarks/kernels.py."""
    return (128, 384) if in_features <= 768 else (128, 768)


def brgemm_blocks(in_features: int) -> tuple[int, int]:
    """(output columns per block, rows per BRGEMM call): the composed (in, nb) block stays in L2."""
    return (64, 64) if in_features <= 768 else (32, 64)


class TorchPath:
    def __init__(
        self,
        cache: ComposedWeightCache | None = None,
        use_extension: bool = True,
        use_microkernel: bool = True,
        packed_cache_bytes: int = PACKED_CACHE_BYTES,
        variant: str | None = None,
    ) -> None:
        self.cache = cache
        self.extension = cpu_ext.load() if use_extension else None
        self.microkernel = (
            use_microkernel and self.extension is not None and bool(self.extension.has_microkernel())
        )
        self.packed = PackedTemplateCache(packed_cache_bytes)
        self.chooser = VariantChooser(forced=forced_variant(variant))

    def variants(self, dtype: torch.dtype) -> list[str]:
        """The variants that run for `dtype` on this machine, in the order they are measured."""
        names = []
        ext = self.extension
        if ext is not None and dtype in (torch.float32, torch.bfloat16) and cpu_ext.brgemm_runs(ext, dtype):
            names.append("brgemm")
        if ext is not None and dtype == torch.float32:
            names.append("microkernel" if self.microkernel else "sgemm")
        names += ["template_space", "composed"]
        return names

    def linear(
        self,
        x: torch.Tensor,
        segments: Segments,
        templates: torch.Tensor,
        coeffs: torch.Tensor,
        bias: torch.Tensor | None,
        cache_keys: Sequence[Hashable] | None = None,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The contract for rows laid out as `segments`; cache_keys[s] names slot s's weight (optional);
        scale and shift (S, out), optional, are each row's task's output scale and shift."""
        if segments.count == 0:
            return x.new_empty(x.shape[0], templates.shape[1])
        if segments.count == 1:
            s = int(segments.slots[0])
            weight = self._weight(templates, coeffs, s, cache_keys)
            return _affine(F.linear(x, weight, bias), _row(scale, s), _row(shift, s))
        if x.requires_grad or templates.dtype != x.dtype:
            return _row_affine(self._composed(x, segments, templates, coeffs, bias), segments, scale, shift)
        runs: dict[str, Callable[[], torch.Tensor]] = {}
        for name in self.variants(x.dtype):
            if name == "brgemm":  # scale and shift in the kernel's epilogue
                runs[name] = self._brgemm(x, segments, templates, coeffs, bias, scale, shift)
                continue
            run = self._variant(name, x, segments, templates, coeffs, bias)
            runs[name] = run if scale is None and shift is None else _then_affine(run, segments, scale, shift)
        return self.chooser.run(kind_of(x, templates, segments.count), runs)

    def _brgemm(
        self,
        x: torch.Tensor,
        segments: Segments,
        templates: torch.Tensor,
        coeffs: torch.Tensor,
        bias: torch.Tensor | None,
        scale: torch.Tensor | None,
        shift: torch.Tensor | None,
    ) -> Callable[[], torch.Tensor]:
        ext, out = self.extension, templates.shape[1]
        assert ext is not None
        nb, mb = brgemm_blocks(x.shape[1])
        layout = Layout("blocks" if x.dtype == torch.float32 else "vnni", nb)
        split = segments.split(ROW_BLOCK)
        return lambda: cpu_ext.brgemm_segmented_linear(
            ext, x, split, self.packed.get(templates, layout), out, coeffs, bias, nb, mb, scale, shift
        )

    def _variant(
        self,
        name: str,
        x: torch.Tensor,
        segments: Segments,
        templates: torch.Tensor,
        coeffs: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> Callable[[], torch.Tensor]:
        ext, out = self.extension, templates.shape[1]
        if name == "brgemm":
            return self._brgemm(x, segments, templates, coeffs, bias, None, None)
        if name == "microkernel":
            assert ext is not None
            nc, kc = micro_blocks(x.shape[1])
            return lambda: cpu_ext.packed_segmented_linear(
                ext, x, segments.split(ROW_BLOCK), self.packed.get(templates), out, coeffs, bias, nc, kc
            )
        if name == "sgemm":
            assert ext is not None
            return lambda: cpu_ext.fused_segmented_linear(
                ext, x, segments.split(ROW_BLOCK), templates, coeffs, bias, tile_for(x.shape[1])
            )
        if name == "template_space":
            return lambda: self._template_space(x, segments, templates, coeffs, bias)
        return lambda: self._composed(x, segments, templates, coeffs, bias)

    def _template_space(
        self,
        x: torch.Tensor,
        segments: Segments,
        templates: torch.Tensor,
        coeffs: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """y = sum_i c[slot(t), i] * (x @ T_i^T) + bias: one GEMM on the stacked templates, then the mix."""
        n, out = templates.shape[0], templates.shape[1]
        xs = segments.gather(x)
        parts = F.linear(xs, self.packed.get(templates, STACKED)).float()  # (T, n * out)
        lengths = segments.starts[1:] - segments.starts[:-1]
        row_coeffs = torch.repeat_interleave(coeffs.to(torch.float32)[segments.slots], lengths, dim=0)
        y = parts[:, :out] * row_coeffs[:, :1]
        for i in range(1, n):
            y.addcmul_(parts[:, i * out : (i + 1) * out], row_coeffs[:, i : i + 1])
        if bias is not None:
            y += bias.to(torch.float32)
        return segments.scatter(y.to(x.dtype))

    def choices(self) -> dict[str, str]:
        """The variant each kind of call seen so far runs."""
        return self.chooser.choices()

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
        return self.cache.get_or_load(cache_keys[s], make)

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


def _row(part: torch.Tensor | None, s: int) -> torch.Tensor | None:
    return None if part is None else part[s]


def _affine(y: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """y * scale + shift with (out,) parts broadcast over the rows (one slot), in float32, in y's dtype."""
    if scale is None and shift is None:
        return y
    out = y.float()
    if scale is not None:
        out = out * scale.float()
    if shift is not None:
        out = out + shift.float()
    return out.to(y.dtype)


def _row_affine(
    y: torch.Tensor, segments: Segments, scale: torch.Tensor | None, shift: torch.Tensor | None
) -> torch.Tensor:
    """Each row of y (input order) scaled and shifted by its slot's (out,) rows of scale and shift."""
    if scale is None and shift is None:
        return y
    lengths = segments.starts[1:] - segments.starts[:-1]
    rows = segments.scatter(torch.repeat_interleave(segments.slots, lengths))
    return row_epilogue(y, rows, scale, shift)


def _then_affine(
    run: Callable[[], torch.Tensor],
    segments: Segments,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> Callable[[], torch.Tensor]:
    return lambda: _row_affine(run(), segments, scale, shift)
