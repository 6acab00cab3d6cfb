"""Neural Mimicry on the real MiniLM, compared on real sentences."""

from __future__ import annotations

import copy

import pytest
import torch

from recast_core.backbone import TextBackbone, sample_sentences
from recast_core.config import minilm_config
from recast_core.mimicry import MimicryResult, mimic
from recast_core.reparam import reparameterize


def test_exact_bank_reproduces_sentence_embeddings(
    backbone: TextBackbone, default_mimicry: MimicryResult
) -> None:
    report = default_mimicry.report
    assert report.output_cosine is not None and report.output_cosine > 0.9999
    assert report.max_relative_error < 1e-5
    # independent check on other real sentences than the report's sample
    texts = [
        "How many moons does Jupiter have?",
        "Free entry to win a prize, text WIN now!",
        "I loved this film",
    ]
    twin = reparameterize(copy.deepcopy(backbone.model), default_mimicry.bank)
    original = backbone.embed(texts)
    rebuilt = backbone.embed(texts, model=twin.model)
    cosine = torch.nn.functional.cosine_similarity(original, rebuilt, dim=1)
    assert float(cosine.min()) > 0.9999
    assert float((original - rebuilt).abs().max()) < 1e-4
    assert twin.collapsed().numel() == 48


@pytest.fixture(scope="module")
def compressed(backbone: TextBackbone) -> dict[str, MimicryResult]:
    config = minilm_config(groups=1, templates=3)  # 6 layers in one group, 3 templates: lossy
    probe = backbone.probe()
    return {
        method: mimic(backbone.model, config, method, probe=probe, progress=False)
        for method in ("svd", "paper")
    }


@pytest.mark.slow
def test_compressed_bank_reports_error_honestly(
    backbone: TextBackbone, compressed: dict[str, MimicryResult]
) -> None:
    result = compressed["svd"]
    report = result.report
    assert report.output_cosine is not None and report.output_cosine < 0.99
    # recompute every (layer, kind) relative error from the reparameterized model's own composed weights
    twin = reparameterize(copy.deepcopy(backbone.model), result.bank)
    original = dict(backbone.model.named_modules())
    rebuilt = dict(twin.model.named_modules())
    errors = []
    with torch.no_grad():
        for kp in twin.plan.kinds:
            for row in kp.modules:
                approx = torch.cat([rebuilt[name].weight() for name in row])
                exact = torch.cat([original[name].weight for name in row])
                errors.append(float((approx - exact).norm() / exact.norm()))
    assert [round(e, 4) for e in errors] == [round(r["relative_error"], 4) for r in report.per_layer]
    fused_max = report.max_relative_error
    assert max(errors) == pytest.approx(fused_max, rel=1e-4)
    assert fused_max > 0.5
    assert len(report.per_layer) == 24 and len(sample_sentences()) == report.sample_size


@pytest.mark.slow
def test_svd_reconstructs_at_least_as_well_as_paper(compressed: dict[str, MimicryResult]) -> None:
    svd, paper = compressed["svd"].report, compressed["paper"].report
    for ours, theirs in zip(svd.per_group, paper.per_group, strict=True):
        assert (ours["kind"], ours["group"]) == (theirs["kind"], theirs["group"])
        assert ours["relative_error"] <= theirs["relative_error"] + 1e-6
    assert svd.mean_relative_error <= paper.mean_relative_error + 1e-6
    assert paper.extra["best_loss"] > 0
