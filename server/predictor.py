"""One forward for many requests of many tasks: tokenize, mixed-task encoder, each task's own head."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import Kernels
from recast_core.backbone import DEFAULT_MAX_LENGTH, TextBackbone
from recast_core.bank import TemplateBank
from recast_core.multitask import MultiTaskEncoder
from server.errors import BadInput, ServerError
from server.heads import Head
from server.registry import TaskEntry
from server.task_ids import split_stored_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    label: str
    scores: dict[str, float]


@dataclass(frozen=True)
class TaskRequest:
    """Texts for one task version, with that version's head (both taken together when the request came)."""

    entry: TaskEntry
    head: Head
    texts: Sequence[str]


def check_texts(texts: Sequence[str], max_inputs: int, max_chars: int) -> None:
    """1..max_inputs texts of at most max_chars characters, each encodable (BadInput names the index)."""
    if not 1 <= len(texts) <= max_inputs:
        raise BadInput(f"inputs must hold 1 to {max_inputs} texts, got {len(texts)}")
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise BadInput(f"inputs[{i}] has {len(text)} characters; the limit is {max_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate (JSON allows "\ud800"): not text
            raise BadInput(
                f"inputs[{i}] is not valid Unicode text: a lone surrogate (U+{ord(text[exc.start]):04X}) at "
                f"character {exc.start}"
            ) from None


class Predictor:
    """Owns the resident encoder; `forward` must not run concurrently (the batcher runs one at a time)."""

    def __init__(
        self,
        backbone: TextBackbone,
        bank: TemplateBank,
        kernels: Kernels,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        self.backbone = backbone
        self.kernels = kernels
        self.max_length = max_length
        self.encoder = MultiTaskEncoder(backbone, bank, kernels)

    def logits(self, requests: Sequence[TaskRequest]) -> list[torch.Tensor]:
        """(len(texts), C_task) logits per request, all requests in one encoder forward."""
        texts = [text for r in requests for text in r.texts]
        if not texts:
            return [torch.zeros(0, len(r.entry.labels)) for r in requests]
        slots: dict[str, int] = {}
        for r in requests:
            slots.setdefault(r.entry.cache_key, len(slots))
        entries = {r.entry.cache_key: r.entry for r in requests}
        table = torch.stack([entries[key].coefficients for key in slots])
        task_of_text = torch.tensor(
            [slots[r.entry.cache_key] for r in requests for _ in r.texts], dtype=torch.int64
        )
        tokens = self.backbone.tokenize(texts, max_length=self.max_length)
        embeddings = self.encoder(
            tokens["input_ids"], tokens["attention_mask"], task_of_text, table, list(slots)
        )
        out, start = [], 0
        for r in requests:
            rows = embeddings[start : start + len(r.texts)]
            start += len(r.texts)
            out.append(torch.nn.functional.linear(rows, *r.head))
        return out

    def warm_up(self) -> None:
        """One forward of two tasks (the bank's own coefficients): the first request pays no build or load."""
        base = self.encoder.base_coefficients
        tokens = self.backbone.tokenize(["warm up", "a second sentence"], max_length=self.max_length)
        self.encoder(
            tokens["input_ids"],
            tokens["attention_mask"],
            torch.tensor([0, 1]),
            torch.stack([base, base * 0.5]),
        )

    def predict(self, requests: Sequence[TaskRequest]) -> list[list[Output] | BaseException]:
        """Each request's outputs, or the error it alone caused (scores are always finite numbers)."""
        results: list[list[Output] | BaseException] = []
        for r, logits in zip(requests, self.logits(requests), strict=True):
            probs = torch.softmax(logits.to(torch.float32), dim=-1)
            if not bool(torch.isfinite(probs).all()):
                results.append(
                    ServerError(
                        f"task {split_stored_id(r.entry.task_id)[1]!r} produced non-finite scores; "
                        "see the server log"
                    )
                )
                log.error("non-finite scores", extra={"task_id": r.entry.task_id, "version": r.entry.version})
                continue
            labels = r.entry.labels
            results.append(
                [
                    Output(
                        label=labels[int(row.argmax())],
                        scores={label: float(p) for label, p in zip(labels, row, strict=True)},
                    )
                    for row in probs
                ]
            )
        return results
