"""Templates re-laid out once for the CPU variants. The bank's templates are frozen: each is packed once.

Layouts (the compose of a task's weight is elementwise, so combining packed templates gives the task's
weight already packed):

    panels       packed[i, p, k, c] = templates[i, 16 p + c, k]               (AVX2 6x16 micro-kernel)
    blocks(nb)   packed[i, b, k * nb + c] = templates[i, nb b + c, k]          (BRGEMM's B, float32)
    vnni(nb)     packed[i, b, (k // 2) * 2 nb + 2 c + k % 2] = templates[i, nb b + c, k]   (bf16 / fp16)
    stacked      packed[i * out + o, k] = templates[i, o, k]                   (template space: one GEMM)

Columns past `out` are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.lru import ByteBudgetLRU

PANEL = 16


@dataclass(frozen=True)
class Layout:
    kind: str  # "panels" | "blocks" | "vnni" | "stacked"
    nb: int = PANEL

    def pack(self, templates: torch.Tensor) -> torch.Tensor:
        if self.kind == "panels":
            return pack(templates)
        if self.kind == "stacked":
            n, out, in_features = templates.shape
            return templates.reshape(n * out, in_features).contiguous()
        if self.kind in ("blocks", "vnni"):
            return pack_blocks(templates, self.nb, vnni=self.kind == "vnni")
        raise ValueError(f"unknown template layout {self.kind!r}")


PANELS = Layout("panels")
STACKED = Layout("stacked")


def _padded_columns(templates: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, out, in) -> (n, ceil(out / width), width, in) with zero rows past `out`."""
    n, out, in_features = templates.shape
    count = -(-out // width)
    padded = templates.new_zeros(n, count * width, in_features, dtype=dtype)
    padded[:, :out] = templates
    return padded.view(n, count, width, in_features)


def pack(templates: torch.Tensor) -> torch.Tensor:
    """(n, out, in) templates -> (n, ceil(out / 16), in, 16) contiguous float32 panels."""
    return _padded_columns(templates, PANEL, torch.float32).transpose(2, 3).contiguous()


def pack_blocks(templates: torch.Tensor, nb: int, vnni: bool) -> torch.Tensor:
    """(n, out, in) -> (n, ceil(out / nb), in * nb): row-major (in, nb) blocks, or VNNI pairs of k."""
    blocks = _padded_columns(templates, nb, templates.dtype).transpose(2, 3)  # (n, B, in, nb)
    n, count, in_features, _ = blocks.shape
    if vnni:
        if in_features % 2:
            raise ValueError(f"VNNI packing needs an even in_features, got {in_features}")
        blocks = blocks.reshape(n, count, in_features // 2, 2, nb).transpose(3, 4)
    return blocks.contiguous().view(n, count, in_features * nb)


def _nbytes(entry: tuple[torch.Tensor, torch.Tensor]) -> int:
    return entry[1].numel() * entry[1].element_size()


class PackedTemplateCache:
    """Packed copies of template tensors, evicted least-recently-used beyond `max_bytes`. Thread-safe.

    An entry is keyed by the tensor's address, shape, strides, dtype, version counter and the layout, and
    keeps the source alive, so a freed tensor's address cannot be reused by another tensor while its entry
    exists, and an in-place change to the templates (which bumps the version) packs them again. Tensors
    made under torch.inference_mode have no version counter; they must not be changed in place after
    first use.
    """

    def __init__(self, max_bytes: int) -> None:
        self._lru: ByteBudgetLRU[tuple[torch.Tensor, torch.Tensor]] = ByteBudgetLRU(max_bytes, _nbytes)

    @property
    def max_bytes(self) -> int:
        return self._lru.max_bytes

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def get(self, templates: torch.Tensor, layout: Layout = PANELS) -> torch.Tensor:
        # inference tensors carry no version counter: they are taken as frozen, like the bank's templates
        version = -1 if templates.is_inference() else templates._version
        shape, strides = tuple(templates.shape), templates.stride()
        key = (templates.data_ptr(), shape, strides, templates.dtype, version, layout)
        return self._lru.get_or_load(key, lambda: (templates, layout.pack(templates)))[1]
