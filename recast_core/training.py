"""Train one task: AdamW on the K coefficient sets of every reparameterized module plus a linear head.

The templates and every other backbone weight stay frozen. The head starts from a linear probe (logistic
regression on the frozen embeddings, its regularisation chosen on the validation split), then head and
coefficients are trained together (LP-FT: Kumar et al., ICLR 2022): the coefficients at a much higher
learning rate than the head (which starts at the probe's optimum), with warm-up and cosine decay; unless
given, the coefficients' learning rate is chosen from a small grid by short trials on validation. Model
selection and early stopping use the validation split only; the test split, when given, is evaluated
once at the end.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from recast_core.artifact import TaskArtifact
from recast_core.backbone import TextBackbone
from recast_core.bank import TemplateBank
from recast_core.data import LabelledTexts, require_classes, stratified_cap, stratified_split
from recast_core.errors import DataError
from recast_core.fitting import Progress, evaluate, fit_choosing_lr, probe_head, text_examples
from recast_core.task_model import TextTaskModel
from recast_core.train_options import TrainOptions

__all__ = ["Progress", "TrainOptions", "TrainResult", "prepare_splits", "train_task"]


@dataclass(frozen=True, eq=False)
class TrainResult:
    artifact: TaskArtifact
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        return self.artifact.training


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
    on_progress: Progress | None = None,
) -> TrainResult:
    """Train coefficients and head on `train`; `on_progress` hears ("embedding", 0|1, 1), then
    ("training", step, steps) after every optimizer step (steps assumes no early stop)."""
    options = options or TrainOptions()
    start = time.perf_counter()
    torch.manual_seed(options.seed)
    train, val, labels = prepare_splits(train, val, test, options)
    index = {label: i for i, label in enumerate(labels)}
    train_y = torch.tensor([index[y] for y in train.labels])
    val_y = torch.tensor([index[y] for y in val.labels])

    model = TextTaskModel(
        backbone, bank, len(labels), edit=options.capacity == "ffn_edit", pool=options.pooling == "query"
    )
    model.labels = tuple(labels)
    if on_progress is not None:
        on_progress("embedding", 0, 1)
    train_x, val_x = (
        backbone.embed(
            split.texts, model=model.reparam.model, max_length=options.max_length, progress=progress
        )
        for split in (train, val)
    )
    probe_c, probe_val = probe_head(model.head, train_x, train_y, val_x, val_y, options.seed)
    if on_progress is not None:
        on_progress("embedding", 1, 1)

    coefficients = list(model.reparam.coefficients)
    extra = model.trainable()[len(coefficients) :]  # the FFN edit and the pooling query, when trained

    def groups(lr: float) -> list[dict[str, object]]:
        head = {"params": list(model.head.parameters()), "lr": options.head_lr}
        if options.coef_lr is None or not extra:
            return [{"params": model.trainable(), "lr": lr}, head]
        return [{"params": coefficients, "lr": options.coef_lr}, {"params": extra, "lr": lr}, head]

    examples = {
        name: text_examples(backbone.tokenize, split.texts, y, options.max_length)
        for name, split, y in (("train", train, train_y), ("val", val, val_y))
    }
    outcome = fit_choosing_lr(
        model, groups, examples["train"], examples["val"], options, progress, on_progress
    )
    summary: dict[str, Any] = {
        "val_accuracy": outcome.val_accuracy,
        "capacity": options.capacity,
        "pooling": options.pooling,
        "trained_parameters": sum(int(p.numel()) for p in model.trainable()),  # K coefficient sets + edit
        "lr": outcome.lr,
        "lr_trials": outcome.lr_trials,
        "from_trial": outcome.from_trial,
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
        test_examples = text_examples(backbone.tokenize, test.texts, test_y, options.max_length)
        summary["test_accuracy"], _ = evaluate(model, test_examples)
        summary["test_examples"] = len(test)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return TrainResult(artifact=model.export(summary), history=outcome.history)
