"""Resolve a RecastConfig against a concrete torch model: which modules, which layers, which groups.

The plan is the single place that knows the canonical order of reparameterized (layer, kind) slots:
kinds in config order, layers ascending within a kind. Coefficient tables are indexed in that order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from recast_core.config import ModuleKind, RecastConfig
from recast_core.errors import PlanError

SUPPORTED = (nn.Linear, nn.Conv2d)
_MAX_LISTED_NAMES = 60


@dataclass(frozen=True)
class KindPlan:
    """One module kind resolved on a model.

    modules[p][j] is the name of member j in the p-th matched layer; rows[j] is member j's slice of the
    fused output dimension; weight_shape is the fused shape (sum of member outputs, *rest).
    """

    kind: ModuleKind
    layers: tuple[int, ...]
    modules: tuple[tuple[str, ...], ...]
    rows: tuple[tuple[int, int], ...]
    weight_shape: tuple[int, ...]
    module_type: str
    groups: tuple[tuple[int, ...], ...]

    def group_of(self, position: int) -> int:
        for g, members in enumerate(self.groups):
            if position in members:
                return g
        raise IndexError(position)


@dataclass(frozen=True)
class PlannedSlot:
    """One coefficient row of the plan: the layer at `position` among its kind's layers, whose members
    (module name, rows of the fused output) compose their weights from the kind's template group `group`."""

    index: int  # the row, in canonical order
    kind_plan: KindPlan
    position: int
    members: tuple[tuple[str, tuple[int, int]], ...]

    @property
    def kind(self) -> str:
        return self.kind_plan.kind.name

    @property
    def layer(self) -> int:
        return self.kind_plan.layers[self.position]

    @property
    def group(self) -> int:
        return self.kind_plan.group_of(self.position)


@dataclass(frozen=True)
class ModulePlan:
    config: RecastConfig
    kinds: tuple[KindPlan, ...]

    def walk(self) -> Iterator[PlannedSlot]:
        """Every coefficient row's slot, in canonical order (the one walk over the planned modules)."""
        index = 0
        for kp in self.kinds:
            for position, row in enumerate(kp.modules):
                yield PlannedSlot(index, kp, position, tuple(zip(row, kp.rows, strict=True)))
                index += 1

    @property
    def slots(self) -> tuple[tuple[str, int], ...]:
        """Canonical (kind name, layer index) order of coefficient rows."""
        return tuple((slot.kind, slot.layer) for slot in self.walk())

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    def describe(self) -> dict[str, dict[str, Any]]:
        """JSON-ready layout, stored in the bank and compared when the bank is applied to a model."""
        return {
            kp.kind.name: {
                "layers": list(kp.layers),
                "modules": [list(m) for m in kp.modules],
                "weight_shape": list(kp.weight_shape),
                "module_type": kp.module_type,
                "groups": [list(g) for g in kp.groups],
            }
            for kp in self.kinds
        }


def split_groups(num_layers: int, groups: int) -> tuple[tuple[int, ...], ...]:
    """Split positions 0..num_layers-1 into `groups` runs of consecutive layers, sizes differing by <= 1."""
    base, extra = divmod(num_layers, groups)
    out: list[tuple[int, ...]] = []
    start = 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(tuple(range(start, start + size)))
        start += size
    return tuple(out)


def _weight_signature(module: nn.Module) -> tuple[str, tuple[int, ...]]:
    assert isinstance(module, SUPPORTED)
    kind = "linear" if isinstance(module, nn.Linear) else "conv2d"
    return kind, tuple(module.weight.shape)


def resolve_plan(model: nn.Module, config: RecastConfig) -> ModulePlan:
    """Match every member pattern of every kind; report all problems in one PlanError."""
    problems: list[str] = []
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, SUPPORTED)}
    claimed: dict[str, str] = {}
    kind_plans: list[KindPlan] = []
    for kind in config.kinds:
        per_layer: dict[int, dict[int, str]] = defaultdict(dict)
        for j, member in enumerate(kind.members):
            regex = kind.regex(member)
            hits = [(name, int(m.group("layer"))) for name in candidates if (m := regex.fullmatch(name))]
            if not hits:
                listed = sorted(candidates)
                more = "" if len(listed) <= _MAX_LISTED_NAMES else f" ... ({len(listed)} in all)"
                problems.append(
                    f"pattern {member!r} of kind {kind.name!r} matches no nn.Linear/nn.Conv2d module; "
                    f"modules that exist: {', '.join(listed[:_MAX_LISTED_NAMES])}{more}"
                )
            for name, layer in hits:
                if name in claimed:
                    problems.append(
                        f"module {name!r} is matched by kinds {claimed[name]!r} and {kind.name!r}"
                    )
                claimed[name] = kind.name
                per_layer[layer][j] = name
        if not per_layer:
            continue
        layers = tuple(sorted(per_layer))
        incomplete = [
            f"layer {layer} lacks {[m for j, m in enumerate(kind.members) if j not in per_layer[layer]]}"
            for layer in layers
            if len(per_layer[layer]) != len(kind.members)
        ]
        if incomplete:
            problems.append(f"kind {kind.name!r} is incomplete: " + ", ".join(incomplete))
            continue
        modules = tuple(tuple(per_layer[layer][j] for j in range(len(kind.members))) for layer in layers)
        signatures = {name: _weight_signature(candidates[name]) for row in modules for name in row}
        reference = [signatures[name] for name in modules[0]]
        mismatched = [
            f"{name} {signatures[name][0]}{list(signatures[name][1])} vs "
            f"{reference[j][0]}{list(reference[j][1])}"
            for row in modules
            for j, name in enumerate(row)
            if signatures[name] != reference[j]
        ]
        module_types = {sig[0] for sig in reference}
        rests = {sig[1][1:] for sig in reference}
        if mismatched:
            problems.append(f"kind {kind.name!r} has modules of different shapes: " + "; ".join(mismatched))
            continue
        if len(module_types) != 1 or len(rests) != 1:
            problems.append(
                f"fused members of kind {kind.name!r} must share module type and input shape, found "
                + ", ".join(
                    f"{name}: {sig[0]}{list(sig[1])}" for name, sig in zip(modules[0], reference, strict=True)
                )
            )
            continue
        if len(layers) < config.groups:
            problems.append(f"kind {kind.name!r} has {len(layers)} layers, fewer than groups={config.groups}")
            continue
        rows: list[tuple[int, int]] = []
        start = 0
        for sig in reference:
            rows.append((start, start + sig[1][0]))
            start += sig[1][0]
        kind_plans.append(
            KindPlan(
                kind=kind,
                layers=layers,
                modules=modules,
                rows=tuple(rows),
                weight_shape=(start, *next(iter(rests))),
                module_type=next(iter(module_types)),
                groups=split_groups(len(layers), config.groups),
            )
        )
    if problems:
        raise PlanError(problems)
    return ModulePlan(config=config, kinds=tuple(kind_plans))
