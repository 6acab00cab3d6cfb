"""A text task on the shared backbone: reparameterized encoder + linear head, loadable from an artifact."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recast_core.artifact import DEFAULT_MAX_BYTES, ArtifactSpec, TaskArtifact
from recast_core.backbone import DEFAULT_MAX_LENGTH, SentenceEncoder, TextBackbone
from recast_core.bank import TemplateBank
from recast_core.ffn_edit import FfnEdit, edit_shape
from recast_core.pooling import QueryPool
from recast_core.reparam import Reparameterized, reparameterize


def artifact_spec(
    bank: TemplateBank,
    hidden_size: int,
    max_bytes: int | None = None,
    embedding_bound: float | None = None,
) -> ArtifactSpec:
    """What `bank` (on a backbone with `hidden_size`, embeddings within `embedding_bound`) expects of a
    task artifact."""
    return ArtifactSpec(
        bank.fingerprint,
        bank.num_slots,
        bank.num_templates,
        hidden_size,
        max_bytes if max_bytes is not None else DEFAULT_MAX_BYTES,
        embedding_bound,
        edit_shape(bank.layout),
    )


@dataclass(frozen=True)
class Prediction:
    label: str
    scores: dict[str, float]


def predictions(probabilities: torch.Tensor, labels: Sequence[str]) -> list[Prediction]:
    """One Prediction per row of (N, C) probabilities: the most probable label and every label's score."""
    return [
        Prediction(
            label=labels[int(row.argmax())],
            scores={label: float(p) for label, p in zip(labels, row.tolist(), strict=True)},
        )
        for row in probabilities
    ]


class TextTaskModel(nn.Module):
    """encoder (a private copy of the backbone, reparameterized on `bank`, with the FFN edit when
    `edit`) -> the backbone's pooling (attention with a learned query when `pool`) -> head."""

    def __init__(
        self,
        backbone: TextBackbone,
        bank: TemplateBank,
        num_labels: int,
        edit: bool = False,
        pool: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.reparam: Reparameterized = reparameterize(copy.deepcopy(backbone.model), bank)
        self.edit = FfnEdit(self.reparam.model, self.reparam.plan) if edit else None
        self.pool = QueryPool(backbone.hidden_size) if pool else None
        self.encoder = SentenceEncoder(self.reparam.model, self.pool, backbone.pooling)
        self.head = nn.Linear(backbone.hidden_size, num_labels)
        self.labels: tuple[str, ...] = tuple(str(i) for i in range(num_labels))
        self.eval()

    @property
    def bank(self) -> TemplateBank:
        return self.reparam.bank

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask))  # (B, C)

    @classmethod
    def from_artifact(
        cls, backbone: TextBackbone, bank: TemplateBank, artifact: TaskArtifact
    ) -> TextTaskModel:
        model = cls(
            backbone,
            bank,
            len(artifact.labels),
            edit=artifact.edit is not None,
            pool=artifact.pool_query is not None,
        )
        model.load_artifact(artifact)
        return model

    def load_artifact(self, artifact: TaskArtifact) -> None:
        if artifact.bank_fingerprint != self.bank.fingerprint:
            raise ValueError(
                "artifact belongs to another bank; validate it with read_artifact(spec=...) first"
            )
        if (artifact.edit is None) != (self.edit is None):
            raise ValueError("the artifact and the model differ in whether they edit the FFN outputs")
        if (artifact.pool_query is None) != (self.pool is None):
            raise ValueError("the artifact and the model differ in whether they pool with a query")
        if self.pool is not None and artifact.pool_query is not None:
            self.pool.load(artifact.pool_query)
        self.reparam.set_coefficients(artifact.coefficients)
        if self.edit is not None and artifact.edit is not None:
            self.edit.load(*artifact.edit)
        with torch.no_grad():
            self.head.weight.copy_(artifact.head_weight)
            self.head.bias.copy_(artifact.head_bias)
        self.labels = artifact.labels

    def trainable(self) -> list[nn.Parameter]:
        """What training changes beside the head: the coefficients and, when present, the FFN edit and the
        pooling query."""
        extra = [*([] if self.edit is None else self.edit.parameters())]
        extra += [] if self.pool is None else list(self.pool.parameters())
        return [*self.reparam.coefficients, *extra]

    def export(self, training: dict[str, Any]) -> TaskArtifact:
        scale, shift = (None, None) if self.edit is None else self.edit.values()
        return TaskArtifact(
            coefficients=self.reparam.collapsed().to(torch.float32),
            head_weight=self.head.weight.detach().clone(),
            head_bias=self.head.bias.detach().clone(),
            labels=self.labels,
            bank_fingerprint=self.bank.fingerprint,
            training=training,
            ffn_scale=scale,
            ffn_shift=shift,
            pool_query=None if self.pool is None else self.pool.value(),
        )

    @torch.no_grad()
    def logits(
        self, texts: Sequence[str], batch_size: int = 64, max_length: int = DEFAULT_MAX_LENGTH
    ) -> torch.Tensor:
        """(len(texts), C) logits, in input order."""
        embeddings = self.backbone.embed(
            texts, model=self.reparam.model, batch_size=batch_size, max_length=max_length, pool=self.pool
        )
        return self.head(embeddings)

    def predict(self, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> list[Prediction]:
        return predictions(torch.softmax(self.logits(texts, max_length=max_length), dim=-1), self.labels)
