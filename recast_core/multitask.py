"""One encoder serving many tasks in one batch: every planned Linear mixes the bank's templates with the
coefficients of the task each sequence belongs to, through the kernel path chosen at startup.

    embeddings = MultiTaskEncoder(backbone, bank, kernels)(input_ids, attention_mask, task_of_sequence,
                                                           coefficients (S, M, n), cache_keys)

Sequences are sorted by task on entry (rows of one task are then contiguous in every layer, one segment
layout serves all layers) and put back in input order on exit. The encoder lives on `kernels.device` in
`dtype` (templates, biases, norms, embeddings); per forward the only host -> device traffic is the token
ids, the attention mask, the (S, M, n) coefficient table and the routing indices, copied from pinned
memory without blocking. The routing is computed on the host, so no layer waits for the device.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import overload

import torch
from torch import nn

from kernels import Kernels, Segments, segments_of
from recast_core.backbone import SentenceEncoder, TextBackbone
from recast_core.bank import TemplateBank
from recast_core.errors import PlanError
from recast_core.ffn_edit import EDITED_KIND, edit_shape
from recast_core.pooling import query_pool
from recast_core.reparam import matching_plan
from recast_core.sentence_pooling import pool_hidden


@dataclass(eq=False)
class _Batch:
    """Routing of one forward: coefficient table per module and the row layout of the sorted sequences."""

    table: torch.Tensor  # (M, S, n) float32, table[m] contiguous
    edits: tuple[torch.Tensor | None, torch.Tensor | None]  # FFN output (scale, shift): (L, S, H) or None
    sequence_slots: torch.Tensor  # (B,) slots of the sorted sequences
    sequence_segments: Segments  # runs of sequences per slot (order is None: already sorted)
    keys: Sequence[Hashable] | None
    _rows: dict[int, tuple[torch.Tensor, Segments]] = field(default_factory=dict)

    def rows(self, length: int) -> tuple[torch.Tensor, Segments]:
        """Per-row slots and segments when every sequence has `length` rows (computed once per length)."""
        if length not in self._rows:
            seg = self.sequence_segments
            self._rows[length] = (
                self.sequence_slots.repeat_interleave(length),
                Segments(None, seg.starts * length, seg.slots),
            )
        return self._rows[length]


class _LayerKeys(Sequence[Hashable]):
    """cache_keys for one layer: (layer, task key) pairs, built only when looked up."""

    def __init__(self, layer: int, keys: Sequence[Hashable]) -> None:
        self.layer, self.keys = layer, keys

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> Hashable: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Hashable]: ...
    def __getitem__(self, index: int | slice) -> Hashable | Sequence[Hashable]:
        if isinstance(index, slice):
            return [(self.layer, k) for k in self.keys[index]]
        return (self.layer, self.keys[index])


class _Router:
    def __init__(self, kernels: Kernels) -> None:
        self.kernels = kernels
        self.batch: _Batch | None = None


class SlotLinear(nn.Module):
    """nn.Linear whose weight is the current batch's per-task template mix (coefficient row `module`)."""

    templates: torch.Tensor

    def __init__(
        self,
        templates: torch.Tensor,
        bias: torch.Tensor | None,
        module: int,
        layer: int,
        router: _Router,
        edit_layer: int | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("templates", templates, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.module, self.layer, self.router = module, layer, router
        self.edit_layer = edit_layer  # FFN outputs: the transformer layer whose scale and shift apply
        self.in_features, self.out_features = int(templates.shape[2]), int(templates.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.router.batch
        if batch is None:
            raise RuntimeError("SlotLinear called outside MultiTaskEncoder.forward")
        rows = x.reshape(-1, self.in_features)
        slot, segments = batch.rows(rows.shape[0] // max(1, batch.sequence_slots.numel()))
        keys = None if batch.keys is None else _LayerKeys(self.layer, batch.keys)
        scale, shift = (
            (None, None)
            if self.edit_layer is None
            else (None if part is None else part[self.edit_layer] for part in batch.edits)
        )
        y = self.router.kernels.linear(
            rows,
            slot,
            self.templates,
            batch.table[self.module],
            self.bias,
            segments=segments,
            cache_keys=keys,
            scale=scale,
            shift=shift,
        )
        return y.view(*x.shape[:-1], self.out_features)


class MultiTaskEncoder(nn.Module):
    """A private copy of the backbone whose planned Linears serve any mix of tasks in one forward."""

    def __init__(
        self,
        backbone: TextBackbone,
        bank: TemplateBank,
        kernels: Kernels,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.device, self.dtype = kernels.device, dtype
        model = copy.deepcopy(backbone.model)
        plan = matching_plan(model, bank)
        self.router = _Router(kernels)
        named = dict(model.named_modules())
        edits = edit_shape(bank.layout)
        layer_index = 0  # of the SlotLinear: its cache keys' layer
        for slot in plan.walk():
            templates = bank.template(slot.kind, slot.group)
            edit = slot.position if edits is not None and slot.kind == EDITED_KIND else None
            for name, (r0, r1) in slot.members:
                old = named[name]
                if not isinstance(old, nn.Linear):
                    kind = type(old).__name__
                    raise PlanError([f"serving supports nn.Linear modules only; {name} is {kind}"])
                new = SlotLinear(templates[:, r0:r1], old.bias, slot.index, layer_index, self.router, edit)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)
                layer_index += 1
        for param in model.parameters():
            param.requires_grad_(False)
        model.to(device=self.device, dtype=dtype)
        self.pooling = backbone.pooling  # the embedding of a task without a query: mean, cls or max
        self.encoder = SentenceEncoder(model, pooling=self.pooling).eval()
        self.num_modules = plan.num_slots
        self.num_edited_layers, self.edit_width = edits if edits is not None else (0, 0)
        self.num_templates = bank.num_templates
        self.hidden_size = backbone.hidden_size
        self.base_coefficients = bank.base_coefficients.mean(dim=1).to(torch.float32)  # (M, n)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        task_of_sequence: torch.Tensor,
        coefficients: torch.Tensor,
        cache_keys: Sequence[Hashable] | None = None,
        ffn_scale: torch.Tensor | None = None,
        ffn_shift: torch.Tensor | None = None,
        pool_query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, H) embeddings; sequence b uses coefficients[task_of_sequence[b]] ((S, M, n) table) and,
        when given, the per-channel scale and shift ((S, L, H) tables) of every layer's FFN output, and
        the attention-pooling query ((S, H); a task's row of zeros: the backbone's pooling, bit for bit)."""
        m, n = self.num_modules, self.num_templates
        if coefficients.ndim != 3 or coefficients.shape[1:] != (m, n):
            raise ValueError(f"coefficients must be (S, {m}, {n}), got {tuple(coefficients.shape)}")
        edit_shape = (coefficients.shape[0], self.num_edited_layers, self.edit_width)
        for name, part in (("ffn_scale", ffn_scale), ("ffn_shift", ffn_shift)):
            if part is not None and tuple(part.shape) != edit_shape:
                raise ValueError(f"{name} must be {edit_shape}, got {tuple(part.shape)}")
        hidden_size = self.hidden_size
        if pool_query is not None and tuple(pool_query.shape) != (coefficients.shape[0], hidden_size):
            raise ValueError(
                f"pool_query must be ({coefficients.shape[0]}, {hidden_size}), got {tuple(pool_query.shape)}"
            )
        if task_of_sequence.shape != (input_ids.shape[0],):
            raise ValueError(
                f"task_of_sequence must be ({input_ids.shape[0]},), got {tuple(task_of_sequence.shape)}"
            )
        if cache_keys is not None and len(cache_keys) != coefficients.shape[0]:
            raise ValueError("cache_keys needs one key per coefficient row")
        slots = task_of_sequence.to(torch.int64)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= coefficients.shape[0]):
            raise ValueError(f"task_of_sequence values must lie in [0, {coefficients.shape[0]})")
        slots = slots.cpu()
        order = torch.sort(slots, stable=True).indices
        sorted_slots = slots[order]
        segments = segments_of(sorted_slots)  # on the host: no layer waits for the device to route
        batch = _Batch(
            table=self._to_device(coefficients.to(torch.float32).permute(1, 0, 2).contiguous()),
            edits=(self._edit_table(ffn_scale), self._edit_table(ffn_shift)),
            sequence_slots=self._to_device(sorted_slots),
            sequence_segments=Segments(
                None, self._to_device(segments.starts), self._to_device(segments.slots)
            ),
            keys=cache_keys,
        )
        ids = self._to_device(input_ids.cpu()[order])
        mask = self._to_device(attention_mask.cpu()[order])
        self.router.batch = batch
        try:
            hidden = self.encoder.hidden(ids, mask)
        finally:
            self.router.batch = None
        embeddings = pool_hidden(hidden, mask, self.pooling)
        if pool_query is not None:
            queries = self._to_device(pool_query.to(torch.float32))[batch.sequence_slots]  # (B, H)
            pooled = queries.ne(0).any(dim=1)
            if bool(pooled.any()):
                embeddings = torch.where(pooled[:, None], query_pool(hidden, mask, queries), embeddings)
        order = self._to_device(order)
        return torch.empty_like(embeddings).index_copy_(0, order, embeddings)

    def _edit_table(self, part: torch.Tensor | None) -> torch.Tensor | None:
        """(S, L, H) -> (L, S, H) float32 on the device, each layer's (S, H) contiguous."""
        return None if part is None else self._to_device(part.to(torch.float32).permute(1, 0, 2).contiguous())

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the encoder's device: pinned and copied without blocking on CUDA."""
        if self.device.type == "cpu" or tensor.device == self.device:
            return tensor
        return tensor.contiguous().pin_memory().to(self.device, non_blocking=True)
