"""Drop-in replacements for nn.Linear and nn.Conv2d whose weight is composed from shared templates.

    W = (1 / K) * sum_k sum_i coefficients[k, i] * templates[i]

`templates` is a frozen (n, out, *in) view into the bank (members of a fused kind hold their own row
slice of the fused templates); `coefficients` is a (K, n) Parameter that fused members share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import compose


class _TemplateWeight(nn.Module):
    templates: torch.Tensor

    def __init__(
        self, templates: torch.Tensor, coefficients: nn.Parameter, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.register_buffer("templates", templates, persistent=False)
        self.coefficients = coefficients
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        collapsed = self.coefficients.mean(dim=0, keepdim=True)  # (1, n): the K sets collapse to n numbers
        return compose(self.templates, collapsed)[0]


class RecastLinear(_TemplateWeight):
    def __init__(
        self, templates: torch.Tensor, coefficients: nn.Parameter, bias: torch.Tensor | None
    ) -> None:
        super().__init__(templates, coefficients, bias)
        self.out_features, self.in_features = int(templates.shape[1]), int(templates.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        n = self.templates.shape[0]
        return f"in_features={self.in_features}, out_features={self.out_features}, templates={n}"


class RecastConv2d(_TemplateWeight):
    def __init__(
        self, templates: torch.Tensor, coefficients: nn.Parameter, bias: torch.Tensor | None, like: nn.Conv2d
    ) -> None:
        super().__init__(templates, coefficients, bias)
        self.stride = like.stride
        self.padding = like.padding
        self.dilation = like.dilation
        self.groups = like.groups
        self.padding_mode = like.padding_mode
        self._reversed_padding_repeated_twice = like._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
