"""Templates re-laid out once for the CPU micro-kernel: 16-column panels, k-major inside a panel.

packed[i, p, k, c] = templates[i, 16 p + c, k]   (zero for 16 p + c >= out)

Composing one task's panel is then a contiguous multiply-add over the n packed template panels, already in
the order the micro-kernel reads. The bank's templates are frozen, so each template tensor is packed once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

PANEL = 16


def pack(templates: torch.Tensor) -> torch.Tensor:
    """(n, out, in) templates -> (n, ceil(out / 16), in, 16) contiguous float32 panels."""
    n, out, in_features = templates.shape
    panels = -(-out // PANEL)
    padded = templates.new_zeros(n, panels * PANEL, in_features, dtype=torch.float32)
    padded[:, :out] = templates
    return padded.view(n, panels, PANEL, in_features).transpose(2, 3).contiguous()


class PackedTemplateCache:
    """Packed copies of template tensors, evicted least-recently-used beyond `max_bytes`. Thread-safe.

    An entry is keyed by the tensor's address, shape, strides and version counter and keeps the source
    alive, so a freed tensor's address cannot be reused by another tensor while its entry exists, and an
    in-place change to the templates (which bumps the version) packs them again. Tensors made under
    torch.inference_mode have no version counter; they must not be changed in place after first use.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, templates: torch.Tensor) -> torch.Tensor:
        # inference tensors carry no version counter: they are taken as frozen, like the bank's templates
        version = -1 if templates.is_inference() else templates._version
        key = (templates.data_ptr(), tuple(templates.shape), templates.stride(), version)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[1]
        packed = pack(templates)
        size = packed.numel() * packed.element_size()
        if size > self.max_bytes:
            return packed
        with self._lock:
            if key not in self._entries:
                self._entries[key] = (templates, packed)
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return packed
