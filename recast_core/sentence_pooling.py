"""The sentence embedding a backbone's last hidden states pool to: as the model directory's
sentence-transformers configuration says (modules.json naming a Pooling module whose config.json sets
`pooling_mode_mean_tokens`, `pooling_mode_cls_token` or `pooling_mode_max_tokens`), the mean otherwise.

    mean: sum_t m[b, t] h[b, t] / sum_t m[b, t]
    cls:  h[b, 0]
    max:  max over the unmasked t of h[b, t]   (per channel)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from recast_core.errors import BackboneError

__all__ = ["POOL_MODES", "pool_hidden", "read_pooling"]

POOL_MODES = ("mean", "cls", "max")
_POOLING_MODULE = "sentence_transformers.models.Pooling"
_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """hidden (B, T, H), mask (B, T) -> (B, H) pooled by `mode` (one of POOL_MODES)."""
    if mode == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        masked = hidden.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min)
        return masked.max(dim=1).values
    raise ValueError(f"pooling mode must be one of {POOL_MODES}, got {mode!r}")


def read_pooling(directory: Path) -> str:
    """The pooling mode the sentence-transformers files in `directory` name; "mean" when there are none.

    A configuration that cannot be read, or names a mode other than one of POOL_MODES (or several), is a
    BackboneError."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return "mean"
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        paths = [str(m.get("path", "")) for m in modules if m.get("type") == _POOLING_MODULE]
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise BackboneError(f"{modules_file} is not a sentence-transformers module list: {exc}") from None
    if not paths:
        return "mean"
    config_file = directory / paths[0] / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        modes = [mode for flag, mode in _FLAGS.items() if config.get(flag)]
    except (OSError, ValueError, AttributeError) as exc:
        raise BackboneError(f"cannot read the pooling configuration {config_file}: {exc}") from None
    if len(modes) != 1 or modes[0] not in POOL_MODES:
        asked = "+".join(modes) or "none"
        raise BackboneError(
            f"{config_file} asks for pooling {asked}; supported: one of {', '.join(POOL_MODES)}"
        )
    return modes[0]
