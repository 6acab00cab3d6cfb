from __future__ import annotations

import pytest
from torch import nn

from recast_core.config import ModuleKind, RecastConfig, minilm_config
from recast_core.errors import ConfigError, PlanError
from recast_core.plan import resolve_plan, split_groups
from recast_core.vision import TinyViT, vit_config


def test_config_reports_every_problem_in_one_error() -> None:
    with pytest.raises(ConfigError) as info:
        RecastConfig(
            kinds=(ModuleKind("a", ("x.{layer}",)), ModuleKind("a", ("no_placeholder",))),
            groups=0,
            templates=-1,
            coeff_sets=0,
        )
    problems = info.value.problems
    assert len(problems) == 5, problems
    text = str(info.value)
    for fragment in ("groups", "templates", "coeff_sets", "used twice", "{layer}"):
        assert fragment in text


def test_config_round_trips_through_dict() -> None:
    config = minilm_config(groups=2, templates=3, coeff_sets=4)
    assert RecastConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError):
        config.replace(groups=0)


def test_minilm_plan_has_fused_qkv_and_48_coefficients(backbone) -> None:  # type: ignore[no-untyped-def]
    plan = resolve_plan(backbone.model, minilm_config())
    qkv = plan.kinds[0]
    assert qkv.kind.name == "qkv"
    assert qkv.weight_shape == (1152, 384)
    assert qkv.rows == ((0, 384), (384, 768), (768, 1152))
    assert [kp.weight_shape for kp in plan.kinds[1:]] == [(384, 384), (1536, 384), (384, 1536)]
    assert qkv.groups == ((0, 1), (2, 3), (4, 5))
    assert plan.num_slots * 2 == 48


def test_unmatched_pattern_lists_existing_module_names() -> None:
    config = RecastConfig(kinds=(ModuleKind("ffn", ("blocks.{layer}.mlp.fc9",)),), groups=2)
    with pytest.raises(PlanError) as info:
        resolve_plan(TinyViT(), config)
    message = str(info.value)
    assert "blocks.{layer}.mlp.fc9" in message
    assert "blocks.0.mlp.fc1" in message and "blocks.3.attn.qkv" in message


def test_plan_rejects_mismatched_shapes_and_too_many_groups() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 5)])
    config = RecastConfig(kinds=(ModuleKind("lin", ("layers.{layer}",)),), groups=1)
    with pytest.raises(PlanError, match="different shapes"):
        resolve_plan(model, config)
    with pytest.raises(PlanError, match="fewer than groups=5"):
        resolve_plan(TinyViT(depth=4), vit_config(groups=5))


def test_split_groups_is_consecutive_and_balanced() -> None:
    assert split_groups(6, 3) == ((0, 1), (2, 3), (4, 5))
    assert split_groups(7, 3) == ((0, 1, 2), (3, 4), (5, 6))
    assert split_groups(6, 1) == ((0, 1, 2, 3, 4, 5),)
