"""Content fingerprints (sha256) of tensors, banks and backbones."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch
from torch import nn


def update_with_tensor(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    """Feed a named tensor (name, dtype, shape, raw bytes) into a running digest."""
    t = tensor.detach().to("cpu").contiguous()
    digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensors_fingerprint(header: object, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over a JSON header followed by named tensors in the given order."""
    digest = hashlib.sha256()
    digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for name, tensor in tensors:
        update_with_tensor(digest, name, tensor)
    return digest.hexdigest()


def backbone_fingerprint(model: nn.Module, excluded_weights: Iterable[str]) -> str:
    """Fingerprint of every parameter and buffer of `model` except the reparameterized weights.

    Those are what a task's output depends on besides the templates and its own coefficients and head.
    """
    excluded = set(excluded_weights)
    state = model.state_dict()
    return tensors_fingerprint(
        {"kind": "backbone"}, ((k, state[k]) for k in sorted(state) if k not in excluded)
    )
