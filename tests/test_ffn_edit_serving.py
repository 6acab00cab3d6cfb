"""Tasks that edit their FFN outputs: served as they train, beside tasks that do not, which stay bit-exact."""

from __future__ import annotations

import pytest
import torch
from server_harness import task_artifact

from kernels import Kernels
from recast_core.artifact import TaskArtifact, read_artifact, serialize
from recast_core.backbone import TextBackbone, sample_sentences
from recast_core.bank import TemplateBank
from recast_core.task_model import TextTaskModel, artifact_spec
from server.heads import Head
from server.predictor import Predictor, TaskRequest
from server.registry import TaskEntry
from server.stores.base import StoredTask

MAX_LENGTH = 32


def _edited(bank: TemplateBank, seed: int) -> TaskArtifact:
    plain = task_artifact(bank, seed)
    gen = torch.Generator().manual_seed(100 + seed)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_edited_tasks_serve_as_they_train_and_leave_other_tasks_bit_exact(
    backbone: TextBackbone, default_bank: TemplateBank, dtype: torch.dtype
) -> None:
    texts = sample_sentences()[:5]
    edited = _edited(default_bank, 1)
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
    # the schema 2 task's rows are bit for bit the same whether its neighbour edits its FFN outputs or not
    assert torch.equal(beside_twin[0], beside_edited[0])
    assert (beside_twin[1] - beside_edited[1]).abs().max() > 1e-2, "the edit must change the logits"
    # the edited task serves what its training model computes (forward hooks on the plain reparam model)
    model = TextTaskModel.from_artifact(backbone, default_bank, edited)
    want = model.logits(texts, max_length=MAX_LENGTH)
    tolerance = {torch.float32: 1e-3, torch.bfloat16: 0.15}[dtype]
    assert float((beside_edited[1] - want).abs().max()) < tolerance
    assert model.export({}).to_bytes() != twin.to_bytes()
    assert torch.equal(model.export({}).edit[0], edited.edit[0])  # type: ignore[index]
