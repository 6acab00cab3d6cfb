"""Per-task pooling of the last hidden states: attention with one learned query per task.

    pooled[b] = sum_t softmax_t(h[b, t] . q / sqrt(H)) h[b, t]      over the unmasked tokens t

A query of zeros weighs every token alike, i.e. it is exactly the mean pool: a task starts there (where its
probe-initialised head was fitted) and, served, a task without a query (or with a zero one) is mean-pooled
bit for bit as before. Mean pooling of a contrastively trained encoder dilutes the few tokens that decide
some tasks (a question's wh-word); the query lets a task weigh them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["QueryPool", "query_pool"]


def query_pool(hidden: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H), mask (B, T), queries (B, H) -> (B, H) in hidden's dtype, computed in float32."""
    h = hidden.float()
    scores = torch.einsum("bth,bh->bt", h, queries.float()) / math.sqrt(hidden.shape[-1])
    scores = scores.masked_fill(mask == 0, float("-inf"))
    weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # a fully masked row: zeros, as the mean pool
    return torch.einsum("bt,bth->bh", weights, h).to(hidden.dtype)


class QueryPool(nn.Module):
    """A trainable (H,) query, from zeros (the mean pool)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return query_pool(hidden, mask, self.query.expand(hidden.shape[0], -1))

    def load(self, query: torch.Tensor) -> None:
        with torch.no_grad():
            self.query.copy_(query)

    def value(self) -> torch.Tensor:
        return self.query.detach().float().clone()
