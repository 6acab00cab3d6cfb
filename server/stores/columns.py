"""Column storage of the task index: strings as one UTF-8 blob with offsets, arrays as raw bytes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Strings:
    """n strings: one UTF-8 blob and n + 1 offsets into it."""

    blob: bytes
    offsets: np.ndarray  # (n + 1,) int64

    @classmethod
    def of(cls, items: Sequence[bytes]) -> Strings:
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, items), dtype=np.int64, count=len(items)), out=offsets[1:])
        return cls(b"".join(items), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[int(self.offsets[i]) : int(self.offsets[i + 1])].decode()

    def take(self, rows: np.ndarray) -> Strings:
        starts, ends = self.offsets[rows].tolist(), self.offsets[rows + 1].tolist()
        blob = self.blob
        return Strings.of([blob[s:e] for s, e in zip(starts, ends, strict=True)])

    @staticmethod
    def concat(parts: Sequence[Strings]) -> Strings:
        offsets = [np.zeros(1, dtype=np.int64)]
        base = 0
        for part in parts:
            offsets.append(part.offsets[1:] + base)
            base += int(part.offsets[-1])
        return Strings(b"".join(p.blob for p in parts), np.concatenate(offsets))


def raw_bytes(values: np.ndarray, dtype: str) -> memoryview:
    """The bytes of `values` as `dtype`, C order (no copy when they already are)."""
    return np.ascontiguousarray(values, dtype=dtype).reshape(-1).view(np.uint8).data


def gather(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, block: int = 16384) -> np.ndarray:
    """values[starts[0]:ends[0]] + values[starts[1]:ends[1]] + ..., in blocks of rows (bounded memory)."""
    lengths = ends - starts
    out = np.empty(int(lengths.sum()), dtype=values.dtype)
    done = 0
    for b in range(0, len(starts), block):
        s, n = starts[b : b + block], lengths[b : b + block]
        total = int(n.sum())
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)  # position inside its row
        out[done : done + total] = values[np.repeat(s, n) + within]
        done += total
    return out
