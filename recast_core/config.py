"""RecastConfig: which modules are reparameterized and how the template banks are shaped.

A module kind names one weight shape shared across layers (e.g. the fused query/key/value projection).
Each member pattern is a module name with one `{layer}` placeholder standing for the layer index; a kind
with several members (query, key, value) is fused: its members' weights are stacked along the output
dimension, share one template bank and ONE coefficient vector per layer, as in the fused QKV of the
official RECAST code. Layers are split into `groups` runs of consecutive layers; each (group, kind) has
`templates` templates; each (layer, kind) has `coeff_sets` coefficient vectors that are averaged:

    W[l, m] = (1 / K) * sum_k sum_i C[k][l, m, i] * T[g(l), m, i]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from recast_core.errors import ConfigError

LAYER = "{layer}"
_KIND_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True)
class ModuleKind:
    """One reparameterized module kind: a name and one member pattern per fused member."""

    name: str
    members: tuple[str, ...]

    def regex(self, member: str) -> re.Pattern[str]:
        """The full-match regex of one member pattern, with the layer index as group `layer`."""
        head, _, tail = member.partition(LAYER)
        return re.compile(re.escape(head) + r"(?P<layer>\d+)" + re.escape(tail))


@dataclass(frozen=True)
class RecastConfig:
    """Frozen, validated configuration of a template bank. All problems are reported in one ConfigError."""

    kinds: tuple[ModuleKind, ...]
    groups: int = 3
    templates: int = 2
    coeff_sets: int = 2
    name: str = field(default="custom")

    def __post_init__(self) -> None:
        problems: list[str] = []
        for attr in ("groups", "templates", "coeff_sets"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{attr} must be an integer >= 1, got {value!r}")
        if not self.kinds:
            problems.append("kinds must name at least one module kind")
        seen_names: set[str] = set()
        seen_patterns: set[str] = set()
        for kind in self.kinds:
            if not _KIND_NAME.match(kind.name):
                problems.append(f"kind name {kind.name!r} must match {_KIND_NAME.pattern}")
            if kind.name in seen_names:
                problems.append(f"kind name {kind.name!r} is used twice")
            seen_names.add(kind.name)
            if not kind.members:
                problems.append(f"kind {kind.name!r} has no member patterns")
            for member in kind.members:
                if member.count(LAYER) != 1:
                    problems.append(
                        f"pattern {member!r} of kind {kind.name!r} must contain {LAYER} exactly once"
                    )
                if member in seen_patterns:
                    problems.append(f"pattern {member!r} is used twice")
                seen_patterns.add(member)
        if problems:
            raise ConfigError(problems)

    @property
    def kind_names(self) -> tuple[str, ...]:
        return tuple(kind.name for kind in self.kinds)

    def replace(self, **changes: Any) -> RecastConfig:
        """A copy with some fields changed, validated again."""
        values: dict[str, Any] = {
            "kinds": self.kinds,
            "groups": self.groups,
            "templates": self.templates,
            "coeff_sets": self.coeff_sets,
            "name": self.name,
        }
        values.update(changes)
        return RecastConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "groups": self.groups,
            "templates": self.templates,
            "coeff_sets": self.coeff_sets,
            "kinds": [{"name": k.name, "members": list(k.members)} for k in self.kinds],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecastConfig:
        try:
            kinds = tuple(
                ModuleKind(str(k["name"]), tuple(str(m) for m in k["members"])) for k in data["kinds"]
            )
            return cls(
                kinds=kinds,
                groups=data["groups"],
                templates=data["templates"],
                coeff_sets=data["coeff_sets"],
                name=str(data.get("name", "custom")),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError([f"malformed config dictionary: {exc!r}"]) from exc


_BERT_LAYER = "encoder.layer.{layer}."

BERT_KINDS: tuple[ModuleKind, ...] = (
    ModuleKind(
        "qkv",
        (
            _BERT_LAYER + "attention.self.query",
            _BERT_LAYER + "attention.self.key",
            _BERT_LAYER + "attention.self.value",
        ),
    ),
    ModuleKind("attn_out", (_BERT_LAYER + "attention.output.dense",)),
    ModuleKind("ffn_in", (_BERT_LAYER + "intermediate.dense",)),
    ModuleKind("ffn_out", (_BERT_LAYER + "output.dense",)),
)


def minilm_config(groups: int = 3, templates: int = 2, coeff_sets: int = 2) -> RecastConfig:
    """The default bank of the project for all-MiniLM-L6-v2 (6 layers): G=3, n=2, K=2, fused QKV."""
    name = "minilm-default" if (groups, templates, coeff_sets) == (3, 2, 2) else "minilm"
    return RecastConfig(
        kinds=BERT_KINDS, groups=groups, templates=templates, coeff_sets=coeff_sets, name=name
    )
