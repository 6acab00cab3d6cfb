"""Representation editing of the FFN outputs (RED, Wu et al., arXiv 2402.15179): per task, the output y of
every layer's FFN output module (after its bias) becomes y * scale[l] + shift[l], channel by channel.

The edited kind is EDITED_KIND (another single-member kind may be named, e.g. a CNN's last convolution
of each block, whose channels are then scaled); its layers, in the plan's order, are the L rows of the
(L, H') tables. The training model applies the edit with forward hooks; the serving encoder applies it in
the kernels' epilogue (`Kernels.linear(scale=, shift=)`), so an edited task costs no extra pass over the
activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recast_core.plan import ModulePlan

EDITED_KIND = "ffn_out"

__all__ = ["EDITED_KIND", "FfnEdit", "edit_shape"]


def edit_shape(layout: dict[str, Any], kind: str = EDITED_KIND) -> tuple[int, int] | None:
    """(L, H') of the edit a bank with this layout can apply to `kind`; None if it has no such
    single-member kind of Linear (or Conv2d) modules."""
    entry = layout.get(kind)
    if entry is None or entry.get("module_type") not in ("linear", "conv2d"):
        return None
    if any(len(row) != 1 for row in entry["modules"]):
        return None
    return len(entry["layers"]), int(entry["weight_shape"][0])


class FfnEdit(nn.Module):
    """Trainable (L, H') scale (from 1) and shift (from 0), applied to the outputs of `model`'s `kind`
    modules by forward hooks (a convolution's output channels: broadcast over its feature map)."""

    def __init__(self, model: nn.Module, plan: ModulePlan, kind: str = EDITED_KIND) -> None:
        super().__init__()
        layout = plan.describe()
        shape = edit_shape(layout, kind)
        if shape is None:
            raise ValueError(f"the model has no single-member Linear or Conv2d kind {kind!r} to edit")
        names = [row[0] for row in layout[kind]["modules"]]
        self.scale = nn.Parameter(torch.ones(shape))
        self.shift = nn.Parameter(torch.zeros(shape))
        conv = layout[kind]["module_type"] == "conv2d"
        for layer, name in enumerate(names):
            model.get_submodule(name).register_forward_hook(self._hook(layer, channel_first=conv))

    def _hook(self, layer: int, channel_first: bool) -> Any:
        def apply(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            scale, shift = self.scale[layer], self.shift[layer]
            if channel_first:  # (B, C, H, W)
                scale, shift = scale[:, None, None], shift[:, None, None]
            return output * scale + shift

        return apply

    def load(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(scale)
            self.shift.copy_(shift)

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached float32 copies of (scale, shift)."""
        return self.scale.detach().float().clone(), self.shift.detach().float().clone()
