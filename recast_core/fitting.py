"""The training loop shared by every method: AdamW, cross-entropy, validation-based early stopping and
model selection, plus the linear probe used to initialise heads.

A split is given as `Examples`: targets, a function that builds a model batch from example indices, and the
order in which to evaluate (by text length for text, to limit padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm.auto import tqdm

from recast_core.errors import ConfigError

PROBE_C_GRID = (0.1, 1.0, 10.0, 100.0)
Batch = dict[str, torch.Tensor]
Tokenize = Callable[[Sequence[str], int], Batch]
# (phase, done, total): called as work advances; may raise to stop the work (e.g. a cancelled job)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    head_lr: float = 2e-3
    weight_decay: float = 1e-6
    patience: int = 2
    val_fraction: float = 0.15
    max_length: int = 64
    max_train_examples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= {low}, got {getattr(self, name)!r}"
            for name, low in (("epochs", 1), ("batch_size", 1), ("patience", 1), ("max_length", 8))
            if getattr(self, name) < low
        ]
        problems += [
            f"{name} must be > 0, got {getattr(self, name)!r}"
            for name in ("lr", "head_lr")
            if not getattr(self, name) > 0
        ]
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.max_train_examples is not None and self.max_train_examples < 2:
            problems.append(f"max_train_examples must be >= 2, got {self.max_train_examples!r}")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class Examples:
    targets: torch.Tensor  # (N,) class indices
    make_batch: Callable[[list[int]], Batch]  # example indices -> model(**batch) keyword arguments
    eval_order: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def text_examples(
    tokenize: Tokenize, texts: Sequence[str], targets: torch.Tensor, max_length: int
) -> Examples:
    order = tuple(sorted(range(len(texts)), key=lambda i: len(texts[i])))
    return Examples(targets, lambda idx: tokenize([texts[i] for i in idx], max_length), order)


def tensor_examples(inputs: torch.Tensor, targets: torch.Tensor, key: str = "x") -> Examples:
    return Examples(targets, lambda idx: {key: inputs[idx]}, tuple(range(len(targets))))


@torch.no_grad()
def batched_logits(model: nn.Module, examples: Examples, batch_size: int = 64) -> torch.Tensor:
    """(N, C) logits of `model(**batch)`, batched in evaluation order, returned in example order."""
    chunks: list[tuple[list[int], torch.Tensor]] = []
    order = list(examples.eval_order)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunks.append((idx, model(**examples.make_batch(idx))))
    out = torch.empty(len(examples), chunks[0][1].shape[1] if chunks else 0)
    for idx, logits in chunks:
        out[idx] = logits
    return out


def evaluate(model: nn.Module, examples: Examples) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a split."""
    logits = batched_logits(model, examples)
    loss = float(F.cross_entropy(logits, examples.targets))
    accuracy = float((logits.argmax(dim=-1) == examples.targets).float().mean())
    return accuracy, loss


@dataclass(frozen=True)
class FitOutcome:
    history: list[dict[str, float]]
    best_epoch: int
    val_accuracy: float


def fit(
    model: nn.Module,
    param_groups: list[dict[str, object]],
    train: Examples,
    val: Examples,
    options: TrainOptions,
    progress: bool = True,
    on_progress: Progress | None = None,
) -> FitOutcome:
    """AdamW on `param_groups` with cross-entropy; the model is evaluated on validation before training and
    after every epoch, early-stopped after `patience` epochs without improvement, and left at its best
    validation epoch (accuracy, then loss). Every parameter with requires_grad is part of the snapshot."""
    optimizer = torch.optim.AdamW(param_groups, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(options.seed)
    val_acc, val_loss = evaluate(model, val)
    history = [{"epoch": 0, "val_accuracy": val_acc, "val_loss": val_loss, "train_loss": math.nan}]
    best = (val_acc, -val_loss, 0, _snapshot(model))
    stale = 0
    steps_per_epoch = math.ceil(len(train) / options.batch_size)
    bar = tqdm(total=options.epochs * steps_per_epoch, desc="training", unit="step", disable=not progress)
    for epoch in range(1, options.epochs + 1):
        order = torch.randperm(len(train), generator=generator).tolist()
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * options.batch_size : (s + 1) * options.batch_size]
            loss = F.cross_entropy(model(**train.make_batch(idx)), train.targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            if on_progress is not None:
                on_progress("training", bar.n, options.epochs * steps_per_epoch)
        val_acc, val_loss = evaluate(model, val)
        history.append(
            {
                "epoch": epoch,
                "val_accuracy": val_acc,
                "val_loss": val_loss,
                "train_loss": float(np.mean(losses)),
            }
        )
        bar.set_postfix(val_acc=f"{val_acc:.4f}", best=f"{max(best[0], val_acc):.4f}")
        if (val_acc, -val_loss) > best[:2]:
            best = (val_acc, -val_loss, epoch, _snapshot(model))
            stale = 0
        else:
            stale += 1
            if stale >= options.patience:
                break
    bar.close()
    _restore(model, best[3])
    return FitOutcome(history=history, best_epoch=best[2], val_accuracy=best[0])


def probe_head(
    head: nn.Linear,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    seed: int,
) -> tuple[float, float]:
    """Fit a logistic regression on frozen features (C chosen on validation) and load it into `head`.

    Returns (chosen C, validation accuracy of the probe)."""
    best: tuple[float, float, LogisticRegression] | None = None
    for c in PROBE_C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        clf.fit(train_x.numpy(), train_y.numpy())
        acc = float((clf.predict(val_x.numpy()) == val_y.numpy()).mean())
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    assert best is not None
    acc, c, clf = best
    coef = torch.as_tensor(clf.coef_, dtype=torch.float32)
    intercept = torch.as_tensor(clf.intercept_, dtype=torch.float32)
    if head.out_features == 2 and coef.shape[0] == 1:  # binary: one logit -> two softmax logits
        coef = torch.cat([-coef / 2, coef / 2])
        intercept = torch.cat([-intercept / 2, intercept / 2])
    with torch.no_grad():
        head.weight.copy_(coef)
        head.bias.copy_(intercept)
    return c, acc


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _restore(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)
