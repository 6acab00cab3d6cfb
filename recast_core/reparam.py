"""Reparameterize any torch model in place: replace planned nn.Linear/nn.Conv2d by template layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recast_core.bank import TemplateBank
from recast_core.errors import BankError
from recast_core.fingerprint import backbone_fingerprint
from recast_core.layers import RecastConv2d, RecastLinear
from recast_core.plan import ModulePlan, resolve_plan


@dataclass(frozen=True, eq=False)
class Reparameterized:
    """A model whose planned modules compose their weights from a bank.

    coefficients[m] is the (K, n) Parameter of slot m in the plan's canonical order; it is the only
    trainable tensor the reparameterization adds.
    """

    model: nn.Module
    plan: ModulePlan
    bank: TemplateBank
    coefficients: nn.ParameterList

    def set_coefficients(self, coeffs: torch.Tensor) -> None:
        """Load (M, n) collapsed coefficients (copied into every one of the K sets) or (M, K, n)."""
        m, k, n = self.bank.base_coefficients.shape
        if coeffs.shape == (m, n):
            coeffs = coeffs.unsqueeze(1).expand(m, k, n)
        if coeffs.shape != (m, k, n):
            raise ValueError(f"coefficients must be ({m}, {n}) or ({m}, {k}, {n}), got {tuple(coeffs.shape)}")
        with torch.no_grad():
            for param, value in zip(self.coefficients, coeffs, strict=True):
                param.copy_(value)

    def coefficient_sets(self) -> torch.Tensor:
        """(M, K, n) copy of the current coefficients."""
        return torch.stack([p.detach() for p in self.coefficients]).clone()

    def collapsed(self) -> torch.Tensor:
        """(M, n): the K sets averaged, which is all inference needs."""
        return self.coefficient_sets().mean(dim=1)

    def reset(self) -> None:
        """Back to the bank's base coefficients, i.e. the mimicked backbone."""
        self.set_coefficients(self.bank.base_coefficients)


def planned_weight_names(plan: ModulePlan) -> list[str]:
    return [f"{name}.weight" for slot in plan.walk() for name, _ in slot.members]


def matching_plan(model: nn.Module, bank: TemplateBank, *, check_backbone: bool = True) -> ModulePlan:
    """The bank's plan on `model`; BankError unless the layout (and, checked, the other weights) match."""
    plan = resolve_plan(model, bank.config)
    layout = plan.describe()
    if layout != bank.layout:
        raise BankError(
            "the model's module layout differs from the bank's: "
            f"expected {_shapes(bank.layout)}, found {_shapes(layout)}"
        )
    if check_backbone:
        found = backbone_fingerprint(model, planned_weight_names(plan))
        if found != bank.backbone_fingerprint:
            raise BankError(
                f"the bank was built from another backbone (expected backbone fingerprint "
                f"{bank.backbone_fingerprint[:16]}..., found {found[:16]}...)"
            )
    return plan


def reparameterize(model: nn.Module, bank: TemplateBank, *, check_backbone: bool = True) -> Reparameterized:
    """Replace the bank's modules in `model` (in place), freeze everything else, load base coefficients.

    The model must have the layout the bank was mimicked from; with check_backbone the remaining weights
    (embeddings, norms, biases, ...) must also be the ones the bank was built with.
    """
    plan = matching_plan(model, bank, check_backbone=check_backbone)
    for param in model.parameters():
        param.requires_grad_(False)
    named = dict(model.named_modules())
    coefficients = nn.ParameterList()
    for slot in plan.walk():
        templates = bank.template(slot.kind, slot.group)
        coeff = nn.Parameter(bank.base_coefficients[slot.index].clone())
        coefficients.append(coeff)
        for name, (r0, r1) in slot.members:
            old = named[name]
            member_templates = templates[:, r0:r1]  # (n, out_j, *in) view into the fused bank
            bias = getattr(old, "bias", None)
            new: nn.Module
            if isinstance(old, nn.Conv2d):
                new = RecastConv2d(member_templates, coeff, bias, old)
            else:
                new = RecastLinear(member_templates, coeff, bias)
            _set_submodule(model, name, new)
    return Reparameterized(model=model, plan=plan, bank=bank, coefficients=coefficients)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _shapes(layout: dict[str, Any]) -> dict[str, Any]:
    return {kind: entry["weight_shape"] for kind, entry in layout.items()}
