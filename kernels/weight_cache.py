"""A small LRU of composed weights, so a batch whose rows all belong to one hot task runs a plain GEMM."""

from __future__ import annotations

import torch

from kernels.lru import ByteBudgetLRU


def _nbytes(weight: torch.Tensor) -> int:
    return weight.numel() * weight.element_size()


class ComposedWeightCache(ByteBudgetLRU[torch.Tensor]):
    """Composed (out, in) weights keyed by the caller, evicted least-recently-used beyond `max_bytes`.

    A key must identify immutable inputs (for example: layer, task id, task version); the cache never
    looks at the tensors behind a key again (`get_or_load(key, compose)`). Thread-safe.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, _nbytes)
