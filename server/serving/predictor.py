"""One forward for many requests of many tasks: token ids in, mixed-task encoder, every task's head at once.

    ids = predictor.encode(texts)                  at the edge, per request (the tokenizer runs there)
    results = predictor.predict(requests)          per batch: one result per request, in order

A request's `kind` says what it asks for: "classify", its task's predictions, or "embed", the pooled
embeddings its task's head would read, L2-normalised; both kinds share the batch's one forward.
`predictor.backbone_request(...)` embeds with the plain backbone: the identity task, whose coefficients
are the bank's base coefficients (they compose the backbone's own weights).

A batch's texts are sorted by length and, where that saves at least a quarter of the padded tokens, run
as two or more length groups (`length_groups`), so padding stays small. The embeddings of every group
stay on the device; the heads of all the batch's tasks run as one matmul against their concatenated
weights, each row then reading its own task's classes; probabilities reach the host once per batch. When
any task of the batch edits its FFN outputs, the batch carries (S, L, H') scale and shift tables (the
other tasks' rows are 1 and 0, which leave their outputs bit for bit as they were); when any pools with a
query, an (S, H) query table (the others' rows are zeros: the mean pool, as before).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from kernels import Kernels
from recast_core.backbone import DEFAULT_MAX_LENGTH, TextBackbone
from recast_core.bank import TemplateBank
from recast_core.multitask import MultiTaskEncoder
from recast_core.task_model import Prediction, predictions
from server.errors import BadInput, ServerError
from server.ids import qualify, split_stored_id
from server.tasks.heads import Head
from server.tasks.registry import TaskEntry

log = logging.getLogger("server.predictor")  # the logger name of its lines as they always were
MIN_GROUP = 8  # texts: a length group smaller than this is not worth its own forward
MIN_SAVING = 0.25  # share of the padded tokens a split must save
BACKBONE_ID = "backbone"  # the identity task's id (in logs; its cache key cannot be a task's digest)
RequestKind = Literal["classify", "embed"]


@dataclass(frozen=True)
class TaskRequest:
    """Texts for one task version, with that version's head (both taken together when the request came),
    the texts' token ids when they were tokenized at the edge (else the forward tokenizes them), and what
    the request asks for: the task's predictions ("classify") or its embeddings ("embed")."""

    entry: TaskEntry
    head: Head
    texts: Sequence[str]
    tokens: Sequence[Sequence[int]] | None = None
    kind: RequestKind = "classify"

    @property
    def longest(self) -> int | None:
        """Tokens of the longest text (None: not tokenized yet)."""
        return None if self.tokens is None else max((len(ids) for ids in self.tokens), default=0)


# a classify request's predictions, or an embed request's (texts, H) float32 unit rows on the host
Answer = list[Prediction] | torch.Tensor
Result = Answer | BaseException  # one request's answer, or the error it alone caused


def check_texts(texts: Sequence[str], max_inputs: int, max_chars: int, field: str = "inputs") -> None:
    """1..max_inputs texts of at most max_chars characters, each encodable (BadInput names the field and
    the index)."""
    if not 1 <= len(texts) <= max_inputs:
        raise BadInput(f"{field} must hold 1 to {max_inputs} texts, got {len(texts)}")
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise BadInput(f"{field}[{i}] has {len(text)} characters; the limit is {max_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate (JSON allows "\ud800"): not text
            raise BadInput(
                f"{field}[{i}] is not valid Unicode text: a lone surrogate (U+{ord(text[exc.start]):04X}) "
                f"at character {exc.start}"
            ) from None


def length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of `lengths` in ascending length, cut into groups that are padded to their own longest.

    A cut is made where it saves at least MIN_SAVING of the padded tokens of the part being cut and
    leaves MIN_GROUP texts or more on each side; each side is then cut again the same way."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    pending = [order]
    while pending:
        part = pending.pop()
        sizes = [lengths[i] for i in part]
        whole = len(part) * (sizes[-1] if sizes else 0)
        best, cut = 0, 0
        for k in range(MIN_GROUP, len(part) - MIN_GROUP + 1):
            saving = whole - (k * sizes[k - 1] + (len(part) - k) * sizes[-1])
            if saving > best:
                best, cut = saving, k
        if cut and best >= MIN_SAVING * whole:
            pending += [part[cut:], part[:cut]]
        else:
            groups.append(part)
    return sorted(groups, key=lambda g: lengths[g[0]] if g else 0)


class Predictor:
    """Owns the resident encoder; `predict` must not run concurrently (the batcher runs one at a time)."""

    def __init__(
        self,
        backbone: TextBackbone,
        bank: TemplateBank,
        kernels: Kernels,
        max_length: int = DEFAULT_MAX_LENGTH,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.backbone = backbone
        self.kernels = kernels
        self.max_length = max_length
        self.device, self.dtype = kernels.device, dtype
        self.encoder = MultiTaskEncoder(backbone, bank, kernels, dtype)
        self.pad_id = int(getattr(backbone.tokenizer, "pad_token_id", 0) or 0)
        self.identity = TaskEntry(  # the plain backbone as a task: the base coefficients, no head
            task_id=BACKBONE_ID,
            version=0,
            coefficients=self.encoder.base_coefficients,
            labels=(),
            head_parameters=0,
            size_bytes=0,
            updated="",
            digest=f"backbone:{bank.fingerprint}",
            created="",
            bank_fingerprint=bank.fingerprint,
        )
        self.no_head = Head(torch.zeros(0, backbone.hidden_size), torch.zeros(0))

    def backbone_request(
        self, tenant: str, texts: Sequence[str], tokens: Sequence[Sequence[int]] | None = None
    ) -> TaskRequest:
        """An embed request of `tenant` for the plain backbone's mean-pooled sentence embeddings."""
        entry = replace(self.identity, task_id=qualify(tenant, BACKBONE_ID))  # queued as the tenant's
        return TaskRequest(entry, self.no_head, texts, tokens, kind="embed")

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to max_length (BadInput if the tokenizer cannot take one)."""
        try:
            ids = self.backbone.tokenizer(list(texts), truncation=True, max_length=self.max_length)[
                "input_ids"
            ]
        except (TypeError, ValueError) as exc:
            raise BadInput(f"inputs could not be tokenized: {exc}") from None
        return [list(map(int, row)) for row in ids]

    def embeddings(self, requests: Sequence[TaskRequest]) -> torch.Tensor:
        """(texts, H) embeddings on the device, rows in request order, all tasks in one table."""
        tokens = [
            ids for r in requests for ids in (r.tokens if r.tokens is not None else self.encode(r.texts))
        ]
        slots: dict[str, int] = {}
        for r in requests:
            slots.setdefault(r.entry.cache_key, len(slots))
        entries = {r.entry.cache_key: r.entry for r in requests}
        table = torch.stack([entries[key].coefficients for key in slots])  # (S, M, n)
        heads = {r.entry.cache_key: r.head for r in requests}
        edits = [heads[key].edit for key in slots]
        edit_shape = (self.encoder.num_edited_layers, self.encoder.edit_width)
        scale = self._table([None if e is None else e[0] for e in edits], edit_shape, 1.0)
        shift = self._table([None if e is None else e[1] for e in edits], edit_shape, 0.0)
        queries = self._table([heads[key].query for key in slots], (self.backbone.hidden_size,), 0.0)
        task_of_text = torch.tensor(
            [slots[r.entry.cache_key] for r in requests for _ in r.texts], dtype=torch.int64
        )
        out = torch.empty(len(tokens), self.backbone.hidden_size, device=self.device, dtype=self.dtype)
        for group in length_groups([len(ids) for ids in tokens]):
            ids, mask = self._padded([tokens[i] for i in group])
            index = torch.tensor(group, dtype=torch.int64)
            rows = self.encoder(ids, mask, task_of_text[index], table, list(slots), scale, shift, queries)
            out.index_copy_(0, index.to(self.device), rows)
        return out

    def _table(
        self, rows: list[torch.Tensor | None], shape: tuple[int, ...], fill: float
    ) -> torch.Tensor | None:
        """(S, *shape) float32 table on the device, one row per task of the batch, `fill` for a task that has
        none (a scale of 1, a shift or query of 0: served as without); None if no task has one."""
        if all(row is None for row in rows):
            return None
        table = torch.full((len(rows), *shape), fill, device=self.device)
        for s, row in enumerate(rows):
            if row is not None:
                table[s].copy_(row)
        return table

    def _padded(self, tokens: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and attention mask, padded on the right to the group's longest text."""
        width = max(len(ids) for ids in tokens)
        ids = torch.full((len(tokens), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(len(tokens), width, dtype=torch.int64)
        for row, seq in enumerate(tokens):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            mask[row, : len(seq)] = 1
        return ids, mask

    def logits(self, requests: Sequence[TaskRequest]) -> list[torch.Tensor]:
        """(len(texts), C_task) float32 logits per request, on the host."""
        logits, classes = self._logits(requests)
        return self._split(requests, logits.cpu(), classes)

    def probabilities(self, requests: Sequence[TaskRequest]) -> list[torch.Tensor]:
        """(len(texts), C_task) float32 probabilities per request, on the host (one copy per batch)."""
        logits, classes = self._logits(requests)
        return self._split(requests, torch.softmax(logits, dim=-1).cpu(), classes)

    def _logits(
        self, requests: Sequence[TaskRequest], embeddings: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """(N, C_max) float32 logits on the device (columns past a row's own classes are -inf), and the
        class count of each request; from the requests' (N, H) float32 `embeddings` when given."""
        classes = [r.head.classes for r in requests]
        if not any(r.texts for r in requests):
            return torch.zeros(0, max(classes, default=0), device=self.device), classes
        if embeddings is None:
            embeddings = self.embeddings(requests).to(torch.float32)  # (N, H)
        heads: dict[str, int] = {}  # digest -> its position among the batch's distinct heads
        for r in requests:
            heads.setdefault(r.entry.cache_key, len(heads))
        by_key = {r.entry.cache_key: r.head for r in requests}
        weights = [by_key[key] for key in heads]
        counts = torch.tensor([head.classes for head in weights])
        offsets = counts.cumsum(0) - counts
        # every task's classes in one (N, sum C) matmul, then each row reads its own task's classes
        weight = torch.cat([head.weight for head in weights]).to(self.device, torch.float32)
        bias = torch.cat([head.bias for head in weights]).to(self.device, torch.float32)
        logits_all = torch.addmm(bias, embeddings, weight.T)
        head_of_row = torch.tensor([heads[r.entry.cache_key] for r in requests for _ in r.texts])
        columns = torch.arange(int(counts.max()))
        valid = columns[None, :] < counts[head_of_row][:, None]  # (N, C_max)
        index = torch.where(valid, offsets[head_of_row][:, None] + columns[None, :], 0)
        logits = logits_all.gather(1, index.to(self.device))
        return logits.masked_fill(~valid.to(self.device), float("-inf")), classes

    @staticmethod
    def _split(requests: Sequence[TaskRequest], rows: torch.Tensor, classes: list[int]) -> list[torch.Tensor]:
        out, start = [], 0
        for r, c in zip(requests, classes, strict=True):
            out.append(rows[start : start + len(r.texts), :c])
            start += len(r.texts)
        return out

    def warm_up(self) -> None:
        """Forwards of one, two and sixteen tasks (scaled bank coefficients) at short and long lengths:
        the first requests pay no build, load or kernel compile, and the CPU path has measured its
        variants for these kinds of batch (others are measured on their first batch)."""
        base = self.encoder.base_coefficients
        table = torch.stack([base * (1.0 - 0.03 * i) for i in range(16)])
        for width in sorted({8, min(32, self.max_length), self.max_length}):
            for tasks in (2, 16):
                ids = torch.full((tasks, width), self.pad_id, dtype=torch.int64)
                mask = torch.ones(tasks, width, dtype=torch.int64)
                self.encoder(ids, mask, torch.arange(tasks), table[:tasks])
            self.encoder(ids[:1], mask[:1], torch.tensor([0]), table[:1])

    def predict(self, requests: Sequence[TaskRequest]) -> list[Result]:
        """Each request's answer (predictions or embeddings, as its kind asks), or the error it alone
        caused (scores and embeddings are always finite numbers)."""
        if all(r.kind == "classify" for r in requests):
            return self._classified(requests, self.probabilities(requests))
        width = self.backbone.hidden_size
        if any(r.texts for r in requests):
            pooled = self.embeddings(requests).to(torch.float32)  # (N, H): one forward for both kinds
        else:
            pooled = torch.zeros(0, width, device=self.device)
        ends = torch.tensor([len(r.texts) for r in requests]).cumsum(0).tolist()
        spans = [range(end - len(r.texts), end) for r, end in zip(requests, ends, strict=True)]

        def of_kind(kind: RequestKind) -> tuple[list[int], list[TaskRequest], torch.Tensor]:
            """The positions of the requests of `kind`, those requests, and their (rows, H) embeddings."""
            chosen = [i for i, r in enumerate(requests) if r.kind == kind]
            index = torch.tensor([row for i in chosen for row in spans[i]], dtype=torch.int64)
            return chosen, [requests[i] for i in chosen], pooled.index_select(0, index.to(pooled.device))

        results: list[Result | None] = [None] * len(requests)
        positions, classify, features = of_kind("classify")
        if classify:
            logits, classes = self._logits(classify, features)
            probabilities = self._split(classify, torch.softmax(logits, dim=-1).cpu(), classes)
            for i, result in zip(positions, self._classified(classify, probabilities), strict=True):
                results[i] = result
        positions, embed, vectors = of_kind("embed")
        unit = F.normalize(vectors, dim=-1).cpu()  # (rows, H) unit rows, one copy to the host
        for i, r, rows in zip(positions, embed, self._split(embed, unit, [width] * len(embed)), strict=True):
            results[i] = rows if bool(torch.isfinite(rows).all()) else self._non_finite(r, "embeddings")
        return [result for result in results if result is not None]

    def _non_finite(self, request: TaskRequest, what: str) -> ServerError:
        """The error of a request whose task produced non-finite `what` (logged once)."""
        entry = request.entry
        log.error(f"non-finite {what}", extra={"task_id": entry.task_id, "version": entry.version})
        task = split_stored_id(entry.task_id)[1]
        return ServerError(f"task {task!r} produced non-finite {what}; see the server log")

    def _classified(self, requests: Sequence[TaskRequest], probabilities: list[torch.Tensor]) -> list[Result]:
        """Each classify request's predictions from its probabilities (an error if any is not finite)."""
        results: list[Result] = []
        for r, probs in zip(requests, probabilities, strict=True):
            if not bool(torch.isfinite(probs).all()):
                results.append(self._non_finite(r, "scores"))
                continue
            results.append(predictions(probs, r.entry.labels))
        return results
