"""Choosing a CPU variant by measurement: the first call of each kind times every candidate on its inputs.

A kind is what decides which variant wins: the layer's shape, the dtype, and the batch's size and run
length in powers of two. Whether rows carry a scale and shift is deliberately not part of it: a task's
rows then run the same variant, bit for bit, whatever its neighbours in the batch carry. The first call
of a kind runs every candidate `trials` times, interleaved, on the real inputs (every candidate computes
the same contract, so any of their results is the answer), keeps the fastest by its best time, and logs
the choice; later calls of that kind run it alone.
RECAST_CPU_VARIANT=<name> forces one variant wherever it applies (tests, and operators who measured).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
ENV_VAR = "RECAST_CPU_VARIANT"
VARIANTS = ("brgemm", "microkernel", "sgemm", "template_space", "composed")


class UnknownVariant(ValueError):
    """RECAST_CPU_VARIANT names no variant."""


def forced_variant(value: str | None = None) -> str | None:
    """The variant $RECAST_CPU_VARIANT (or `value`) forces; None when unset. Unknown names raise."""
    raw = os.environ.get(ENV_VAR, "") if value is None else value
    name = raw.strip().lower()
    if not name:
        return None
    if name not in VARIANTS:
        raise UnknownVariant(f"{ENV_VAR}={raw!r} is not one of {', '.join(VARIANTS)}")
    return name


@dataclass(frozen=True)
class Kind:
    in_features: int
    out_features: int
    templates: int
    dtype: torch.dtype
    rows_log2: int
    run_log2: int

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"{self.in_features}->{self.out_features} n={self.templates} {dtype} "
            f"rows~2^{self.rows_log2} run~2^{self.run_log2}"
        )


def kind_of(x: torch.Tensor, templates: torch.Tensor, runs: int) -> Kind:
    rows = max(1, x.shape[0])
    return Kind(
        int(templates.shape[2]),
        int(templates.shape[1]),
        int(templates.shape[0]),
        x.dtype,
        int(math.log2(rows)),
        int(math.log2(max(1.0, rows / max(1, runs)))),
    )


class VariantChooser:
    """Per kind, the fastest candidate measured on the first call of that kind. Thread-safe."""

    def __init__(self, trials: int = 3, forced: str | None = None) -> None:
        if trials < 1:
            raise ValueError("trials must be >= 1")
        self.trials, self.forced = trials, forced
        self._chosen: dict[Kind, str] = {}
        self._timings: dict[Kind, dict[str, float]] = {}
        self._lock = threading.Lock()

    def run(self, kind: Kind, candidates: Mapping[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
        """The result of the chosen candidate for `kind` (measuring them all on the first call)."""
        if not candidates:
            raise ValueError("no candidate variant")
        chosen = self._chosen.get(kind)
        if chosen is not None and chosen in candidates:
            return candidates[chosen]()
        if self.forced in candidates or len(candidates) == 1:
            name = self.forced if self.forced in candidates else next(iter(candidates))
            assert name is not None
            with self._lock:
                self._chosen[kind] = name
            return candidates[name]()
        best = {name: math.inf for name in candidates}
        result: torch.Tensor | None = None
        for _ in range(self.trials):
            for name, candidate in candidates.items():
                start = time.perf_counter()
                result = candidate()
                best[name] = min(best[name], time.perf_counter() - start)
        winner = min(best, key=lambda name: best[name])
        with self._lock:
            self._chosen[kind] = winner
            self._timings[kind] = best
        ms = {name: round(1e3 * seconds, 3) for name, seconds in best.items()}
        log.info("cpu variant chosen", extra={"kind": str(kind), "variant": winner, "ms": ms})
        assert result is not None
        return result

    def choices(self) -> dict[str, str]:
        """Every kind seen so far and the variant it runs (forced ones included)."""
        with self._lock:
            chosen = dict(self._chosen)
        return {str(kind): name for kind, name in sorted(chosen.items(), key=lambda kv: str(kv[0]))}

    def timings(self) -> dict[str, dict[str, float]]:
        """The best seconds of every candidate, per measured kind."""
        with self._lock:
            return {str(kind): dict(times) for kind, times in self._timings.items()}
