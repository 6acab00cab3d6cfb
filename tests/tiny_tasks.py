"""Task artifacts for a tiny stand-in bank (4 modules, 2 templates, hidden size 8): tests of the registry,
the stores and the batcher that need valid artifacts but no backbone."""

from __future__ import annotations

import torch

from recast_core.artifact import ArtifactSpec, TaskArtifact

TINY_SPEC = ArtifactSpec(bank_fingerprint="ab" * 32, num_slots=4, num_templates=2, hidden_size=8)


def tiny_artifact(
    seed: int = 0,
    labels: tuple[str, ...] = ("a", "b", "c"),
    fingerprint: str = TINY_SPEC.bank_fingerprint,
    training: dict[str, object] | None = None,
) -> TaskArtifact:
    """A valid artifact for TINY_SPEC with random values drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return TaskArtifact(
        coefficients=torch.randn(4, 2, generator=gen),
        head_weight=torch.randn(len(labels), 8, generator=gen),
        head_bias=torch.randn(len(labels), generator=gen),
        labels=labels,
        bank_fingerprint=fingerprint,
        training=dict(training or {}),
    )
