"""Reparameterization by module names on a ViT (fused qkv) and a ResNet-style CNN."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from recast_core.bank import BANK_FILE, load_bank
from recast_core.config import RecastConfig
from recast_core.errors import BankError
from recast_core.layers import RecastConv2d, RecastLinear
from recast_core.mimicry import mimic
from recast_core.reparam import reparameterize
from recast_core.vision import TinyResNet, TinyViT, resnet_config, vit_config

CASES = [
    pytest.param(TinyViT, vit_config, RecastLinear, id="vit"),
    pytest.param(TinyResNet, resnet_config, RecastConv2d, id="resnet"),
]


def _model(factory: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = factory()
    if isinstance(model, TinyResNet):  # give BatchNorm non-trivial statistics
        model.train()
        with torch.no_grad():
            model(torch.randn(64, 1, 28, 28))
    return model.eval()


@pytest.mark.parametrize(("factory", "make_config", "layer_type"), CASES)
def test_exact_mimicry_reproduces_outputs(factory, make_config, layer_type) -> None:  # type: ignore[no-untyped-def]
    model = _model(factory)
    images = torch.randn(8, 1, 28, 28)
    config: RecastConfig = make_config(groups=2, templates=2)  # 4 layers / 2 groups = n
    result = mimic(model, config, "svd", probe=lambda m: m(images), progress=False)
    assert result.report.max_relative_error < 1e-5
    assert result.report.output_cosine is not None and result.report.output_cosine > 0.99999
    twin = reparameterize(copy.deepcopy(model), result.bank)
    replaced = [m for m in twin.model.modules() if isinstance(m, layer_type)]
    assert len(replaced) == twin.plan.num_slots  # one module per slot (qkv is natively fused here)
    with torch.no_grad():
        assert torch.allclose(twin.model(images), model(images), atol=1e-4, rtol=1e-4)
        # a different task changes the output; reset gives the backbone back
        twin.set_coefficients(torch.randn(twin.plan.num_slots, 2))
        assert not torch.allclose(twin.model(images), model(images), atol=1e-3)
        twin.reset()
        assert torch.allclose(twin.model(images), model(images), atol=1e-4, rtol=1e-4)
    trainable = [p for p in twin.model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == twin.plan.num_slots * config.coeff_sets * config.templates


@pytest.mark.parametrize(("factory", "make_config", "layer_type"), CASES)
def test_compressed_bank_reports_its_error(factory, make_config, layer_type) -> None:  # type: ignore[no-untyped-def]
    model = _model(factory)
    images = torch.randn(8, 1, 28, 28)
    result = mimic(
        model, make_config(groups=1, templates=2), "svd", probe=lambda m: m(images), progress=False
    )
    assert result.report.max_relative_error > 0.1  # 4 random layers cannot be rank 2
    assert result.report.output_cosine is not None and result.report.output_cosine < 0.9999


def test_bank_save_load_and_tamper_detection(tmp_path: Path) -> None:
    model = _model(TinyViT)
    bank = mimic(model, vit_config(), "svd", progress=False).bank
    bank.save(tmp_path)
    loaded = load_bank(tmp_path)
    assert loaded.fingerprint == bank.fingerprint
    assert all(torch.equal(loaded.templates[k], bank.templates[k]) for k in bank.templates)
    raw = bytearray((tmp_path / BANK_FILE).read_bytes())
    raw[-5] ^= 0xFF  # flip a bit inside the last tensor's data
    (tmp_path / BANK_FILE).write_bytes(bytes(raw))
    with pytest.raises(BankError, match="corrupt"):
        load_bank(tmp_path)
    with pytest.raises(BankError, match="no template bank"):
        load_bank(tmp_path / "missing")


def test_bank_refuses_another_backbone() -> None:
    bank = mimic(_model(TinyViT), vit_config(), "svd", progress=False).bank
    torch.manual_seed(1)
    other = TinyViT().eval()  # same layout, different weights
    with pytest.raises(BankError, match="another backbone"):
        reparameterize(other, bank)
    with pytest.raises(BankError, match="layout differs"):
        reparameterize(TinyViT(dim=32), bank, check_backbone=False)


def test_more_templates_than_layers_stays_exact_and_adds_directions() -> None:
    model = _model(TinyViT)
    images = torch.randn(4, 1, 28, 28)
    result = mimic(model, vit_config(groups=2, templates=3), "svd", probe=lambda m: m(images), progress=False)
    assert result.report.max_relative_error < 1e-5
    base = result.bank.base_coefficients
    assert torch.all(base[..., 2] == 0)  # the extra template starts unused
    extra = result.bank.template("qkv", 0)[2]
    assert float(extra.norm()) > 0
