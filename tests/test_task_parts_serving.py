"""Tasks that edit their FFN outputs or pool with a query: served as they train, beside tasks that do
neither, which stay bit-exact."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from server_harness import task_artifact

from kernels import Kernels
from recast_core.artifact import TaskArtifact, read_artifact, serialize
from recast_core.backbone import TextBackbone, sample_sentences
from recast_core.bank import TemplateBank
from recast_core.task_model import TextTaskModel, artifact_spec
from server.serving.predictor import Predictor, TaskRequest
from server.stores.base import StoredTask
from server.tasks.heads import Head
from server.tasks.registry import TaskEntry

MAX_LENGTH = 32


def _edited(bank: TemplateBank, seed: int, pooled: bool = False) -> TaskArtifact:
    """With an FFN edit, or (pooled) with a pooling query instead."""
    plain = task_artifact(bank, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    if pooled:
        return replace(plain, pool_query=0.5 * torch.randn(384, generator=gen))
    return TaskArtifact(
        coefficients=plain.coefficients,
        head_weight=plain.head_weight,
        head_bias=plain.head_bias,
        labels=plain.labels,
        bank_fingerprint=plain.bank_fingerprint,
        training=plain.training,
        ffn_scale=1 + 0.2 * torch.randn(6, 384, generator=gen),
        ffn_shift=0.1 * torch.randn(6, 384, generator=gen),
    )


def _schema_2(artifact: TaskArtifact) -> bytes:
    """The bytes the previous schema wrote for an artifact without an edit."""
    metadata = {
        "schema_version": "2",
        "bank_fingerprint": artifact.bank_fingerprint,
        "labels": '["negative", "positive"]',
        "created": artifact.created,
        "training": "{}",
    }
    tensors = {
        "coefficients": artifact.coefficients,
        "head.weight": artifact.head_weight,
        "head.bias": artifact.head_bias,
    }
    return serialize(tensors, metadata, checksum=True)


def _request(name: str, data: bytes, bank: TemplateBank, texts: list[str]) -> TaskRequest:
    artifact = read_artifact(data, artifact_spec(bank, 384))
    entry = TaskEntry.of(StoredTask(name, 1, data, "now"), artifact, name)
    return TaskRequest(entry, Head.of(artifact), texts)


@pytest.mark.parametrize(
    ("dtype", "pooled"),
    [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True), (torch.bfloat16, True)],
    ids=["edit-fp32", "edit-bf16", "query-fp32", "query-bf16"],
)
def test_edited_tasks_serve_as_they_train_and_leave_other_tasks_bit_exact(
    backbone: TextBackbone, default_bank: TemplateBank, dtype: torch.dtype, pooled: bool
) -> None:
    texts = sample_sentences()[:5]
    edited = _edited(default_bank, 1, pooled)
    twin = task_artifact(default_bank, 1)  # the same coefficients and head, no edit
    old = _schema_2(task_artifact(default_bank, 2))
    predictor = Predictor(backbone, default_bank, Kernels("cpu"), max_length=MAX_LENGTH, dtype=dtype)
    plain = _request("plain", old, default_bank, texts)
    pairs = {
        name: [plain, _request(name, artifact.to_bytes(), default_bank, texts)]
        for name, artifact in (("twin", twin), ("edited", edited))
    }
    predictor.logits(pairs["twin"])  # the first batch of its kind chooses the CPU variants: then fixed
    beside_twin, beside_edited = (predictor.logits(pairs[name]) for name in ("twin", "edited"))
    # the schema 2 task's rows are bit for bit the same whether its neighbour edits (or pools) or not
    assert torch.equal(beside_twin[0], beside_edited[0])
    assert (beside_twin[1] - beside_edited[1]).abs().max() > 1e-2, "the edit must change the logits"
    # the edited task serves what its training model computes (forward hooks on the plain reparam model)
    model = TextTaskModel.from_artifact(backbone, default_bank, edited)
    want = model.logits(texts, max_length=MAX_LENGTH)
    error = float((beside_edited[1] - want).abs().max())
    if dtype == torch.float32:
        assert error < 1e-3
    else:  # bf16 rounding, not the edit, sets the error: the twin's own gap to its fp32 model is the floor
        twin_model = TextTaskModel.from_artifact(backbone, default_bank, twin)
        twin_want = twin_model.logits(texts, max_length=MAX_LENGTH)
        floor = float((beside_twin[1] - twin_want).abs().max())
        effect = float((want - twin_want).abs().max())
        assert error < max(2 * floor, 0.05), (error, floor)
        # an edit served wrongly would be off by about its effect
        assert error < 0.25 * effect, (error, effect)
    assert model.export({}).to_bytes() != twin.to_bytes()
    exported = model.export({})
    if pooled:
        assert exported.edit is None and torch.equal(exported.pool_query, edited.pool_query)  # type: ignore[arg-type]
    else:
        assert exported.pool_query is None and torch.equal(exported.edit[0], edited.edit[0])  # type: ignore[index]


def test_a_zero_query_is_the_mean_pool(backbone: TextBackbone) -> None:
    from recast_core.backbone import mean_pool
    from recast_core.pooling import query_pool

    tokens = backbone.tokenize(sample_sentences()[:4], max_length=MAX_LENGTH)
    with torch.no_grad():
        hidden = backbone.model(**tokens).last_hidden_state
    mask = tokens["attention_mask"]
    zero = query_pool(hidden, mask, torch.zeros(4, 384))
    torch.testing.assert_close(zero, mean_pool(hidden, mask), rtol=1e-5, atol=1e-6)
    sharp = query_pool(hidden, mask, 50 * hidden[:, 1])  # a query aimed at each text's first word
    assert float((sharp - hidden[:, 1]).abs().max()) < float((zero - hidden[:, 1]).abs().max())
