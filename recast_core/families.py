"""Model families a backbone directory may hold: the module kinds of each, resolved from config.json's
`model_type`, and the default bank configuration for a backbone of that family.

    family_of("roberta").kinds   ->  qkv, attn_out, ffn_in, ffn_out on encoder.layer.{layer}.*
    bank_config(backbone)        ->  RecastConfig with at most `templates` layers per group (exact mimicry)

A model type outside FAMILIES is a BackboneError that lists the model's Linear modules (layer indices
shown as {layer}), the names a custom RecastConfig would match.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from recast_core.config import BERT_KINDS, ModuleKind, RecastConfig, minilm_config
from recast_core.errors import BackboneError, ConfigError

if TYPE_CHECKING:
    from recast_core.backbone import TextBackbone

__all__ = ["FAMILIES", "Family", "bank_config", "family_of", "linear_patterns", "unsupported_family"]

_MAX_LISTED = 40


@dataclass(frozen=True)
class Family:
    """A model family: the `model_type`s it covers, its module kinds, and whether its model class takes
    `add_pooling_layer` (the pooler is never used: tasks pool the last hidden states)."""

    name: str
    model_types: tuple[str, ...]
    kinds: tuple[ModuleKind, ...]
    has_pooler: bool = True


def _attention_ffn(
    layer: str, qkv: tuple[str, str, str], out: str, ffn_in: str, ffn_out: str
) -> tuple[ModuleKind, ...]:
    return (
        ModuleKind("qkv", tuple(layer + name for name in qkv)),
        ModuleKind("attn_out", (layer + out,)),
        ModuleKind("ffn_in", (layer + ffn_in,)),
        ModuleKind("ffn_out", (layer + ffn_out,)),
    )


FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert",), BERT_KINDS),
    Family("roberta", ("roberta",), BERT_KINDS),
    Family("xlm-roberta", ("xlm-roberta",), BERT_KINDS),
    Family(
        "distilbert",
        ("distilbert",),
        _attention_ffn(
            "transformer.layer.{layer}.",
            ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
            "attention.out_lin",
            "ffn.lin1",
            "ffn.lin2",
        ),
        has_pooler=False,
    ),
    Family(
        "mpnet",
        ("mpnet",),
        _attention_ffn(
            "encoder.layer.{layer}.",
            ("attention.attn.q", "attention.attn.k", "attention.attn.v"),
            "attention.attn.o",
            "intermediate.dense",
            "output.dense",
        ),
    ),
)


def family_of(model_type: str) -> Family | None:
    """The family covering `model_type` (config.json's), or None."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def linear_patterns(model: nn.Module) -> list[str]:
    """The names of `model`'s nn.Linear modules, the first index of each shown as {layer}, deduplicated."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            seen[re.sub(r"\.\d+(?=\.|$)", ".{layer}", name, count=1)] = None
    return list(seen)


def unsupported_family(model_type: str, directory: str, model: nn.Module) -> BackboneError:
    """The error for a backbone of a family outside FAMILIES, listing its Linear modules."""
    names = linear_patterns(model)
    listed = ", ".join(names[:_MAX_LISTED]) + (
        f" ... ({len(names)} in all)" if len(names) > _MAX_LISTED else ""
    )
    supported = ", ".join(t for family in FAMILIES for t in family.model_types)
    return BackboneError(
        f"backbone {directory}: model_type {model_type!r} is not a supported family ({supported}); "
        f"its Linear modules: {listed or 'none'}"
    )


def bank_config(
    backbone: TextBackbone, groups: int | None = None, templates: int = 2, coeff_sets: int = 2
) -> RecastConfig:
    """The bank configuration for `backbone`: the bundled MiniLM's default (G=3) for the bundled MiniLM,
    else its family's kinds with G = ceil(layers / templates) unless `groups` is given, so that each group
    has at most `templates` layers and mimicry is exact."""
    if backbone.path is None:
        return minilm_config(3 if groups is None else groups, templates, coeff_sets)
    family = family_of(backbone.family)
    if family is None:
        raise BackboneError(f"backbone {backbone.name} is of no supported family ({backbone.family!r})")
    layers = backbone.num_layers
    chosen = math.ceil(layers / templates) if groups is None else groups
    if not 1 <= chosen <= layers:
        fit = f"groups={chosen} does not fit the {layers} layers of backbone {backbone.name}"
        raise ConfigError([f"{fit}: choose 1 to {layers}"])
    name = f"{family.name}-default" if groups is None else family.name
    return RecastConfig(
        kinds=family.kinds, groups=chosen, templates=templates, coeff_sets=coeff_sets, name=name
    )
