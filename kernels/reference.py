"""Torch references: the semantics every faster path must reproduce, one per kernel, same signatures.

All three linear functions compute the same thing (the contract of `segmented_template_linear`); the
strategy references spell out how the matching Triton kernel computes it, so a test can compare both.
"""

from __future__ import annotations

import torch

from kernels.checks import check_linear_args
from kernels.segments import segments_of


def compose(templates: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Mix templates into one weight per coefficient row.

    templates: (n, *w)   coeffs: (S, n)   ->   W: (S, *w)
        W[s] = sum_i coeffs[s, i] * templates[i]
    """
    n = templates.shape[0]
    if coeffs.ndim != 2 or coeffs.shape[1] != n:
        raise ValueError(
            f"coeffs must be (S, {n}) to match templates {tuple(templates.shape)}, got {tuple(coeffs.shape)}"
        )
    flat = templates.reshape(n, -1)  # (n, prod(w))
    return (coeffs.to(flat.dtype) @ flat).reshape(coeffs.shape[0], *templates.shape[1:])


def row_epilogue(
    y: torch.Tensor, slot: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None
) -> torch.Tensor:
    """y[t] * scale[slot[t]] + shift[slot[t]] (either may be None), computed in float32, in y's dtype."""
    if scale is None and shift is None:
        return y
    out = y.float()
    rows = slot.long()
    if scale is not None:
        out = out * scale.float()[rows]
    if shift is not None:
        out = out + shift.float()[rows]
    return out.to(y.dtype)


def segmented_template_linear(
    x: torch.Tensor,
    slot: torch.Tensor,
    templates: torch.Tensor,
    coeffs: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row task linear layer (the contract).

    x: (T, in)   slot: (T,) int   templates: (n, out, in)   coeffs: (S, n)   bias: (out,) or None
    scale, shift: (S, out) or None (a task's per-channel output scale and shift)
        for t in range(T):
            W = sum_i coeffs[slot[t], i] * templates[i]      # (out, in)
            y[t] = (x[t] @ W^T + bias) * scale[slot[t]] + shift[slot[t]]
    returns y: (T, out)
    """
    check_linear_args(x, slot, templates, coeffs, bias, scale=scale, shift=shift)
    weights = compose(templates, coeffs)  # (S, out, in)
    y = torch.bmm(weights[slot.long()], x.unsqueeze(-1)).squeeze(-1)  # (T, out)
    if bias is not None:
        y = y + bias
    return row_epilogue(y, slot, scale, shift)


def fused_segmented_linear(
    x: torch.Tensor,
    slot: torch.Tensor,
    templates: torch.Tensor,
    coeffs: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Strategy (a): rows grouped by slot, one composed weight and one GEMM per group.

    for each run of rows sharing slot s (rows sorted by slot):
        y[rows] = (x[rows] @ (sum_i coeffs[s, i] * templates[i])^T + bias) * scale[s] + shift[s]
    """
    check_linear_args(x, slot, templates, coeffs, bias, scale=scale, shift=shift)
    seg = segments_of(slot)
    xs = seg.gather(x)
    y = x.new_empty(x.shape[0], templates.shape[1])
    starts = seg.starts.tolist()
    for j, s in enumerate(seg.slots.tolist()):
        weight = compose(templates, coeffs[s : s + 1])[0]
        y[starts[j] : starts[j + 1]] = torch.nn.functional.linear(xs[starts[j] : starts[j + 1]], weight, bias)
    return row_epilogue(seg.scatter(y), slot, scale, shift)


def template_space_linear(
    x: torch.Tensor,
    slot: torch.Tensor,
    templates: torch.Tensor,
    coeffs: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Strategy (b): one GEMM against all n templates, then a per-row mix (n x the FLOPs, no sorting).

    z[t, i] = x[t] @ templates[i]^T                      # (T, n, out)
    y[t]    = (sum_i coeffs[slot[t], i] * z[t, i] + bias) * scale[slot[t]] + shift[slot[t]]
    """
    check_linear_args(x, slot, templates, coeffs, bias, scale=scale, shift=shift)
    n, out, in_features = templates.shape
    z = (x @ templates.reshape(n * out, in_features).T).view(-1, n, out)
    y = torch.einsum("tn,tno->to", coeffs.to(z.dtype)[slot.long()], z)
    if bias is not None:
        y = y + bias
    return row_epilogue(y, slot, scale, shift)
