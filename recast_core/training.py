"""Train one task: AdamW on the K coefficient sets of every reparameterized module plus a linear head.

The templates and every other backbone weight stay frozen. The head starts from a linear probe (logistic
regression on the frozen embeddings, its regularisation chosen on the validation split), then head and
coefficients are trained together (LP-FT: Kumar et al., ICLR 2022). Model selection and early stopping
use the validation split only; the test split, when given, is evaluated once at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm.auto import tqdm

from recast_core.artifact import TaskArtifact
from recast_core.backbone import TextBackbone
from recast_core.bank import TemplateBank
from recast_core.data import LabelledTexts, require_classes, stratified_cap, stratified_split
from recast_core.errors import ConfigError, DataError
from recast_core.task_model import TextTaskModel

PROBE_C_GRID = (0.1, 1.0, 10.0, 100.0)


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


@dataclass(frozen=True, eq=False)
class TrainResult:
    artifact: TaskArtifact
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        return self.artifact.training


Tokenize = Callable[[Sequence[str], int], dict[str, torch.Tensor]]


@torch.no_grad()
def batched_logits(
    model: nn.Module, tokenize: Tokenize, texts: Sequence[str], max_length: int, batch_size: int = 64
) -> torch.Tensor:
    """(len(texts), C) logits of `model(input_ids, attention_mask)`; batches formed by length, input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks: list[tuple[list[int], torch.Tensor]] = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunks.append((idx, model(**tokenize([texts[i] for i in idx], max_length))))
    out = torch.empty(len(texts), chunks[0][1].shape[1] if chunks else 0)
    for idx, logits in chunks:
        out[idx] = logits
    return out


def _evaluate(
    model: nn.Module, tokenize: Tokenize, texts: Sequence[str], targets: torch.Tensor, max_length: int
) -> tuple[float, float]:
    logits = batched_logits(model, tokenize, texts, max_length)
    loss = float(F.cross_entropy(logits, targets))
    accuracy = float((logits.argmax(dim=-1) == targets).float().mean())
    return accuracy, loss


@dataclass(frozen=True)
class FitOutcome:
    history: list[dict[str, float]]
    best_epoch: int
    val_accuracy: float


def fit(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    tokenize: Tokenize,
    train: tuple[Sequence[str], torch.Tensor],
    val: tuple[Sequence[str], torch.Tensor],
    options: TrainOptions,
    progress: bool = True,
) -> FitOutcome:
    """AdamW on `param_groups` with cross-entropy; the model is evaluated on validation before training and
    after every epoch, early-stopped after `patience` epochs without improvement, and left at its best
    validation epoch (accuracy, then loss). Every parameter with requires_grad is part of the snapshot."""
    texts, targets = train
    val_texts, val_targets = val
    optimizer = torch.optim.AdamW(param_groups, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(options.seed)
    val_acc, val_loss = _evaluate(model, tokenize, val_texts, val_targets, options.max_length)
    history = [{"epoch": 0, "val_accuracy": val_acc, "val_loss": val_loss, "train_loss": math.nan}]
    best = (val_acc, -val_loss, 0, _snapshot(model))
    stale = 0
    steps_per_epoch = math.ceil(len(texts) / options.batch_size)
    bar = tqdm(total=options.epochs * steps_per_epoch, desc="training", unit="step", disable=not progress)
    for epoch in range(1, options.epochs + 1):
        order = torch.randperm(len(texts), generator=generator).tolist()
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * options.batch_size : (s + 1) * options.batch_size]
            batch = tokenize([texts[i] for i in idx], options.max_length)
            loss = F.cross_entropy(model(**batch), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
        val_acc, val_loss = _evaluate(model, tokenize, val_texts, val_targets, options.max_length)
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


def linear_probe(
    train_x: torch.Tensor,
    train_y: np.ndarray,
    val_x: torch.Tensor,
    val_y: np.ndarray,
    num_labels: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Logistic regression on frozen embeddings, C chosen on validation.

    Returns (W (C, H), b (C,), chosen C, validation accuracy)."""
    best: tuple[float, float, LogisticRegression] | None = None
    for c in PROBE_C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        clf.fit(train_x.numpy(), train_y)
        acc = float((clf.predict(val_x.numpy()) == val_y).mean())
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    assert best is not None
    acc, c, clf = best
    coef = torch.as_tensor(clf.coef_, dtype=torch.float32)
    intercept = torch.as_tensor(clf.intercept_, dtype=torch.float32)
    if num_labels == 2 and coef.shape[0] == 1:  # binary: one logit -> two softmax logits
        coef = torch.cat([-coef / 2, coef / 2])
        intercept = torch.cat([-intercept / 2, intercept / 2])
    return coef, intercept, c, acc


def prepare_splits(
    train: LabelledTexts, val: LabelledTexts | None, test: LabelledTexts | None, options: TrainOptions
) -> tuple[LabelledTexts, LabelledTexts, list[str]]:
    """Validate the data and carve the validation split from the training data when none is given."""
    if val is None:
        require_classes(train, minimum_per_class=2)
        kept, held = stratified_split(train.labels, options.val_fraction, options.seed)
        train, val = train.subset(kept), train.subset(held)
    labels = require_classes(train)
    for name, split in (("validation", val), ("test", test)):
        if split is not None:
            unseen = sorted(set(split.labels) - set(labels))
            if unseen:
                raise DataError(f"{name} data has labels never seen in training: {unseen[:10]}")
    if options.max_train_examples is not None and len(train) > options.max_train_examples:
        train = train.subset(stratified_cap(train.labels, options.max_train_examples, options.seed))
    return train, val, labels


def train_task(
    backbone: TextBackbone,
    bank: TemplateBank,
    train: LabelledTexts,
    *,
    val: LabelledTexts | None = None,
    test: LabelledTexts | None = None,
    options: TrainOptions | None = None,
    progress: bool = True,
) -> TrainResult:
    options = options or TrainOptions()
    start = time.perf_counter()
    torch.manual_seed(options.seed)
    train, val, labels = prepare_splits(train, val, test, options)
    index = {label: i for i, label in enumerate(labels)}
    train_y = torch.tensor([index[y] for y in train.labels])
    val_y = torch.tensor([index[y] for y in val.labels])

    model = TextTaskModel(backbone, bank, len(labels))
    model.labels = tuple(labels)
    train_x, val_x = (
        backbone.embed(
            split.texts, model=model.reparam.model, max_length=options.max_length, progress=progress
        )
        for split in (train, val)
    )
    weight, bias, probe_c, probe_val = linear_probe(
        train_x, train_y.numpy(), val_x, val_y.numpy(), len(labels), options.seed
    )
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)

    groups = [
        {"params": list(model.reparam.coefficients), "lr": options.lr},
        {"params": list(model.head.parameters()), "lr": options.head_lr},
    ]
    outcome = fit(
        model, groups, backbone.tokenize, (train.texts, train_y), (val.texts, val_y), options, progress
    )
    summary: dict[str, Any] = {
        "val_accuracy": outcome.val_accuracy,
        "best_epoch": outcome.best_epoch,
        "epochs_run": len(outcome.history) - 1,
        "probe_val_accuracy": probe_val,
        "probe_C": probe_c,
        "train_examples": len(train),
        "val_examples": len(val),
        "backbone": backbone.name,
        "options": asdict(options),
    }
    if test is not None:
        test_y = torch.tensor([index[y] for y in test.labels])
        summary["test_accuracy"], _ = _evaluate(
            model, backbone.tokenize, test.texts, test_y, options.max_length
        )
        summary["test_examples"] = len(test)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return TrainResult(artifact=model.export(summary), history=outcome.history)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _restore(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)
