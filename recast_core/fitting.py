"""The training loop shared by every method: AdamW, cross-entropy, validation-based early stopping and
model selection, plus the linear probe used to initialise heads.

A split is given as `Examples`: targets, a function that builds a model batch from example indices, and the
order in which to evaluate (by text length for text, to limit padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm.auto import tqdm

from recast_core.train_options import TrainOptions

PROBE_C_GRID = (0.1, 1.0, 10.0, 100.0)
Batch = dict[str, torch.Tensor]
Tokenize = Callable[[Sequence[str], int], Batch]
# (phase, done, total): called as work advances; may raise to stop the work (e.g. a cancelled job)
Progress = Callable[[str, int, int], None]


def lr_factor(step: int, total: int, warmup: float, schedule: str) -> float:
    """The learning-rate multiplier at optimizer step `step` of `total`: linear warm-up over the first
    `warmup` fraction, then constant or a cosine decay to 0 at the last step."""
    warm = math.ceil(warmup * total)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant" or total <= warm:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total - warm)))


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
    val_loss: float = math.nan
    lr: float | None = None  # the main learning rate used (chosen on validation when options.lr is None)
    lr_trials: dict[str, float] = field(default_factory=dict)  # candidate -> its trial's best val accuracy
    from_trial: bool = False  # the state kept is the chosen lr's trial's (the full run did not beat it)


def fit_choosing_lr(
    model: nn.Module,
    groups: Callable[[float], list[dict[str, object]]],
    train: Examples,
    val: Examples,
    options: TrainOptions,
    progress: bool = True,
    on_progress: Progress | None = None,
) -> FitOutcome:
    """`fit` with `groups(lr)` as the parameter groups; with options.lr None, lr is first chosen from
    options.lr_grid: every candidate trains `select_epochs` epochs from the same start (the schedule
    compressed to the trial), the best validation (accuracy, then loss) wins, then the full run starts
    from that same start. The model is left at the best validated state of all these runs (a trial's, if
    the full run never beat it: `from_trial`). The trials cost len(lr_grid) x select_epochs epochs;
    progress counts them."""
    steps_per_epoch = math.ceil(len(train) / options.batch_size)
    if options.lr is not None:
        outcome = fit(model, groups(options.lr), train, val, options, progress, on_progress)
        return replace(outcome, lr=options.lr)
    trial = replace(options, epochs=options.select_epochs, patience=options.select_epochs)
    trial_steps = trial.epochs * steps_per_epoch
    total = len(options.lr_grid) * trial_steps + options.epochs * steps_per_epoch
    start = _snapshot(model)
    trials: dict[float, tuple[FitOutcome, dict[str, torch.Tensor]]] = {}
    for i, lr in enumerate(options.lr_grid):
        _restore(model, start)
        span = (i * trial_steps, total)
        outcome = fit(model, groups(lr), train, val, trial, progress, on_progress, span, f"lr {lr:g}")
        trials[lr] = (replace(outcome, lr=lr), _snapshot(model))
    chosen = max(options.lr_grid, key=lambda lr: _score(trials[lr][0]))
    _restore(model, start)
    span = (len(options.lr_grid) * trial_steps, total)
    outcome = replace(fit(model, groups(chosen), train, val, options, progress, on_progress, span), lr=chosen)
    best_trial, state = trials[chosen]
    if _score(best_trial) > _score(outcome):
        _restore(model, state)
        outcome = replace(best_trial, history=outcome.history, from_trial=True)
    report = {f"{lr:g}": round(trials[lr][0].val_accuracy, 6) for lr in options.lr_grid}
    return replace(outcome, lr_trials=report)


def _score(outcome: FitOutcome) -> tuple[float, float]:
    return outcome.val_accuracy, -outcome.val_loss


def fit(
    model: nn.Module,
    param_groups: list[dict[str, object]],
    train: Examples,
    val: Examples,
    options: TrainOptions,
    progress: bool = True,
    on_progress: Progress | None = None,
    span: tuple[int, int] | None = None,
    desc: str = "training",
) -> FitOutcome:
    """AdamW on `param_groups` with cross-entropy; the model is evaluated on validation before training and
    after every epoch, early-stopped after `patience` epochs without improvement, and left at its best
    validation epoch (accuracy, then loss). Every parameter with requires_grad is part of the snapshot,
    so every trained parameter must be one of `model`'s (a ValueError otherwise: a stray one would keep its
    last value when the model is restored to its best epoch)."""
    _require_owned(model, param_groups)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(options.seed)
    val_acc, val_loss = evaluate(model, val)
    history = [{"epoch": 0, "val_accuracy": val_acc, "val_loss": val_loss, "train_loss": math.nan}]
    best = (val_acc, -val_loss, 0, _snapshot(model))
    stale = 0
    steps_per_epoch = math.ceil(len(train) / options.batch_size)
    total = options.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, options.warmup, options.schedule)
    )
    offset, reported = span or (0, total)  # progress: this fit's steps within a larger run
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress)
    for epoch in range(1, options.epochs + 1):
        order = torch.randperm(len(train), generator=generator).tolist()
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * options.batch_size : (s + 1) * options.batch_size]
            loss = F.cross_entropy(model(**train.make_batch(idx)), train.targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            if on_progress is not None:  # counted here: a disabled bar counts nothing
                on_progress("training", offset + (epoch - 1) * steps_per_epoch + s + 1, reported)
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
    return FitOutcome(history=history, best_epoch=best[2], val_accuracy=best[0], val_loss=-best[1])


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


def _require_owned(model: nn.Module, param_groups: list[dict[str, object]]) -> None:
    owned = {id(p) for p in model.parameters() if p.requires_grad}
    trained = [p for group in param_groups for p in group["params"]]  # type: ignore[attr-defined]
    stray = sum(id(p) not in owned for p in trained)
    if stray:
        raise ValueError(
            f"{stray} of the {len(trained)} trained parameters are not parameters of the model with "
            "requires_grad: register their module on the model so that model selection restores them"
        )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _restore(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)
