"""One MiniLM forward serving many tasks: each sequence's embedding equals its task's own model."""

from __future__ import annotations

import pytest
import torch

from kernels import Kernels
from recast_core.backbone import TextBackbone, sample_sentences
from recast_core.bank import TemplateBank
from recast_core.errors import BankError
from recast_core.multitask import MultiTaskEncoder
from recast_core.task_model import TextTaskModel


def _task_coefficients(bank: TemplateBank, count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = bank.base_coefficients.mean(dim=1)
    return base + 0.05 * torch.randn(count, *base.shape, generator=gen)  # (S, M, n)


@pytest.mark.parametrize("path", ["torch", "reference"])
def test_mixed_batch_matches_each_task_alone(
    backbone: TextBackbone, default_bank: TemplateBank, path: str
) -> None:
    encoder = MultiTaskEncoder(backbone, default_bank, Kernels("cpu", path=path))
    coefficients = _task_coefficients(default_bank, 3, seed=0)
    texts = sample_sentences()[:8]
    tokens = backbone.tokenize(texts, max_length=32)
    tasks = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1])
    mixed = encoder(
        tokens["input_ids"], tokens["attention_mask"], tasks, coefficients, cache_keys=["a", "b", "c"]
    )
    for s in range(3):
        single = TextTaskModel(backbone, default_bank, num_labels=2)
        single.reparam.set_coefficients(coefficients[s])
        alone = single.encoder(tokens["input_ids"], tokens["attention_mask"])
        rows = tasks == s
        torch.testing.assert_close(mixed[rows], alone[rows], rtol=1e-4, atol=2e-5)


def test_base_coefficients_reproduce_the_plain_backbone(
    backbone: TextBackbone, default_bank: TemplateBank
) -> None:
    encoder = MultiTaskEncoder(backbone, default_bank, Kernels("cpu", path="torch"))
    texts = sample_sentences()[:6]
    tokens = backbone.tokenize(texts, max_length=32)
    plain = backbone.embed(texts, max_length=32)
    base = encoder.base_coefficients.unsqueeze(0)
    for tasks, table in (
        (torch.zeros(6, dtype=torch.long), base),
        (torch.arange(6) % 2, base.repeat(2, 1, 1)),
    ):
        got = encoder(tokens["input_ids"], tokens["attention_mask"], tasks, table)
        assert torch.nn.functional.cosine_similarity(got, plain).min() > 0.99999
        torch.testing.assert_close(got, plain, rtol=1e-3, atol=1e-4)


def test_bad_routing_is_rejected(backbone: TextBackbone, default_bank: TemplateBank) -> None:
    encoder = MultiTaskEncoder(backbone, default_bank, Kernels("cpu", path="torch"))
    tokens = backbone.tokenize(["one", "two"], max_length=8)
    table = _task_coefficients(default_bank, 2, seed=1)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with pytest.raises(ValueError, match="task_of_sequence values"):
        encoder(ids, mask, torch.tensor([0, 2]), table)
    with pytest.raises(ValueError, match="coefficients must be"):
        encoder(ids, mask, torch.tensor([0, 1]), table[:, :3])
    with pytest.raises(ValueError, match="one key per"):
        encoder(ids, mask, torch.tensor([0, 1]), table, cache_keys=["a"])


def test_other_backbone_is_rejected(backbone: TextBackbone, default_bank: TemplateBank) -> None:
    import copy

    other = copy.deepcopy(backbone)
    with torch.no_grad():
        next(p for n, p in other.model.named_parameters() if "LayerNorm" in n).add_(1.0)
    with pytest.raises(BankError, match="another backbone"):
        MultiTaskEncoder(other, default_bank, Kernels("cpu", path="torch"))


@pytest.mark.parametrize("path", ["torch", "reference"])
def test_ffn_output_scale_and_shift_per_task(
    backbone: TextBackbone, default_bank: TemplateBank, path: str
) -> None:
    """Per-task per-channel scale and shift of every layer's FFN output (RED), in one mixed batch: each
    sequence equals the plain backbone with its own task's edit applied by forward hooks."""
    encoder = MultiTaskEncoder(backbone, default_bank, Kernels("cpu", path=path))
    layers, width = encoder.num_edited_layers, encoder.edit_width
    assert (layers, width) == (6, 384)
    gen = torch.Generator().manual_seed(4)
    scale = 1 + 0.2 * torch.randn(2, layers, width, generator=gen)
    shift = 0.1 * torch.randn(2, layers, width, generator=gen)
    texts = sample_sentences()[:6]
    tokens = backbone.tokenize(texts, max_length=32)
    tasks = torch.tensor([1, 0, 1, 0, 0, 1])
    table = encoder.base_coefficients.unsqueeze(0).repeat(2, 1, 1)
    got = encoder(
        tokens["input_ids"], tokens["attention_mask"], tasks, table, ffn_scale=scale, ffn_shift=shift
    )
    for s in range(2):
        outputs = [layer.output.dense for layer in backbone.model.encoder.layer]
        hooks = [
            dense.register_forward_hook(lambda _m, _i, y, a=scale[s, i], b=shift[s, i]: y * a + b)
            for i, dense in enumerate(outputs)
        ]
        try:
            want = backbone.embed(texts, max_length=32)
        finally:
            for hook in hooks:
                hook.remove()
        rows = tasks == s
        torch.testing.assert_close(got[rows], want[rows], rtol=1e-3, atol=1e-4)
    plain = encoder(tokens["input_ids"], tokens["attention_mask"], tasks, table)
    assert (plain - got).abs().max() > 1e-2, "the edit must change the embeddings"
    with pytest.raises(ValueError, match="ffn_scale must be"):
        encoder(tokens["input_ids"], tokens["attention_mask"], tasks, table, ffn_scale=scale[:, :5])
