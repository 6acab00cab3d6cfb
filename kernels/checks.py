"""Argument checks shared by every implementation of the segmented template linear."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_linear_args(
    x: torch.Tensor,
    slot: torch.Tensor,
    templates: torch.Tensor,
    coeffs: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    check_range: bool = True,
) -> None:
    """Raise ValueError naming the first argument that does not fit the contract.

    x (T, in) float, slot (T,) integer in [0, S), templates (n, out, in) of x's dtype, coeffs (S, n) float,
    bias (out,) or None, scale and shift (S, out) float or None; all on one device. `check_range` reads
    slot's min and max (a device sync on GPU).
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (T, in), got shape {tuple(x.shape)}")
    if templates.ndim != 3:
        raise ValueError(f"templates must be (n, out, in), got shape {tuple(templates.shape)}")
    n, out, in_features = templates.shape
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} features but templates expect {in_features}")
    if x.dtype not in FLOAT_DTYPES or templates.dtype != x.dtype:
        raise ValueError(f"x and templates must share a float dtype, got {x.dtype} and {templates.dtype}")
    if slot.shape != (x.shape[0],) or slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot must be an integer ({x.shape[0]},) tensor, got {slot.dtype} {tuple(slot.shape)}"
        )
    if coeffs.ndim != 2 or coeffs.shape[1] != n or not coeffs.is_floating_point():
        raise ValueError(f"coeffs must be a float (S, {n}) tensor, got {coeffs.dtype} {tuple(coeffs.shape)}")
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"bias must be ({out},) or None, got {tuple(bias.shape)}")
    for name, part in (("scale", scale), ("shift", shift)):
        if part is not None and (part.shape != (coeffs.shape[0], out) or not part.is_floating_point()):
            raise ValueError(
                f"{name} must be a float ({coeffs.shape[0]}, {out}) tensor or None, got {part.dtype} "
                f"{tuple(part.shape)}"
            )
    devices = {t.device for t in (x, slot, templates, coeffs, bias, scale, shift) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if check_range and slot.numel() > 0:
        low, high = int(slot.min()), int(slot.max())
        if low < 0 or high >= coeffs.shape[0]:
            raise ValueError(f"slot values must lie in [0, {coeffs.shape[0]}), got [{low}, {high}]")
