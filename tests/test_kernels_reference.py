from __future__ import annotations

import pytest
import torch

from kernels import Kernels, compose


def test_compose_mixes_templates() -> None:
    templates = torch.randn(3, 5, 4)
    coeffs = torch.randn(2, 3)
    expected = torch.stack([sum(coeffs[s, i] * templates[i] for i in range(3)) for s in range(2)])
    assert torch.allclose(compose(templates, coeffs), expected, atol=1e-6)
    with pytest.raises(ValueError, match="coeffs must be"):
        compose(templates, torch.randn(2, 4))


def test_segmented_template_linear_matches_per_row_loop() -> None:
    linear = Kernels("cpu").linear
    torch.manual_seed(0)
    templates, coeffs, bias = torch.randn(2, 6, 5), torch.randn(4, 2), torch.randn(6)
    x = torch.randn(9, 5)
    slot = torch.randint(0, 4, (9,))
    y = linear(x, slot, templates, coeffs, bias)
    for t in range(9):
        w = coeffs[slot[t], 0] * templates[0] + coeffs[slot[t], 1] * templates[1]
        assert torch.allclose(y[t], x[t] @ w.T + bias, atol=1e-5)
    assert linear(x[:0], slot[:0], templates, coeffs, None).shape == (0, 6)
