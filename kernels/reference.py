"""Torch reference implementations: the semantics every faster path must reproduce."""

from __future__ import annotations

import torch


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


def segmented_template_linear(
    x: torch.Tensor,
    slot: torch.Tensor,
    templates: torch.Tensor,
    coeffs: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row task linear layer.

    x: (T, in)   slot: (T,) int   templates: (n, out, in)   coeffs: (S, n)   bias: (out,) or None
        for t in range(T):
            W = sum_i coeffs[slot[t], i] * templates[i]      # (out, in)
            y[t] = x[t] @ W^T + bias
    returns y: (T, out)
    """
    if x.ndim != 2 or templates.ndim != 3 or x.shape[1] != templates.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} does not fit templates {tuple(templates.shape)}")
    if slot.shape != (x.shape[0],):
        raise ValueError(f"slot must be ({x.shape[0]},), got {tuple(slot.shape)}")
    weights = compose(templates, coeffs)  # (S, out, in)
    y = torch.bmm(weights[slot], x.unsqueeze(-1)).squeeze(-1)  # (T, out)
    if bias is not None:
        y = y + bias
    return y
