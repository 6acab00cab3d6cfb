"""Rows grouped by task slot: the segment layout every fused strategy works on."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segments:
    """Rows sorted by slot, cut into runs that share one slot.

    order: permutation that sorts the rows by slot (None when they already are);
    starts: (G + 1,) int64 offsets of the runs in the sorted rows; slots: (G,) int64 slot of each run.
    """

    order: torch.Tensor | None
    starts: torch.Tensor
    slots: torch.Tensor
    _splits: dict[int, Segments] = field(default_factory=dict, compare=False, repr=False)

    @property
    def count(self) -> int:
        return int(self.slots.numel())

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (in input order) in sorted-by-slot order."""
        return rows if self.order is None else rows.index_select(0, self.order)

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows computed in sorted order, put back in input order (the inverse of `gather`)."""
        return rows if self.order is None else torch.empty_like(rows).index_copy_(0, self.order, rows)

    def split(self, max_rows: int) -> Segments:
        """The same layout with every run cut into pieces of at most `max_rows` rows (for load balance)."""
        if max_rows <= 0:
            raise ValueError("max_rows must be positive")
        if max_rows not in self._splits:  # one layout serves every layer of a batch: split it once
            self._splits[max_rows] = self._split(max_rows)
        return self._splits[max_rows]

    def _split(self, max_rows: int) -> Segments:
        lengths = self.starts[1:] - self.starts[:-1]
        pieces = torch.div(lengths + max_rows - 1, max_rows, rounding_mode="floor").clamp_min(1)
        if pieces.numel() == 0 or int(pieces.max()) <= 1:
            return self
        run = torch.repeat_interleave(torch.arange(self.count, device=pieces.device), pieces)
        first = torch.cumsum(pieces, 0) - pieces
        offset = (torch.arange(run.numel(), device=run.device) - first[run]) * max_rows
        begins = self.starts[:-1][run] + offset
        ends = torch.minimum(begins + max_rows, self.starts[1:][run])
        return Segments(self.order, torch.cat([begins, ends[-1:]]), self.slots[run])


def segments_of(slot: torch.Tensor) -> Segments:
    """The segment layout of a per-row slot vector (stable: rows of one slot keep their order)."""
    slot = slot.to(torch.int64)
    if slot.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=slot.device)
        return Segments(None, torch.zeros(1, dtype=torch.int64, device=slot.device), empty)
    order: torch.Tensor | None = None
    if slot.numel() > 1 and bool((slot[1:] < slot[:-1]).any()):
        order = torch.sort(slot, stable=True).indices
        slot = slot[order]
    slots, counts = torch.unique_consecutive(slot, return_counts=True)
    starts = torch.zeros(slots.numel() + 1, dtype=torch.int64, device=slot.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return Segments(order, starts, slots)
