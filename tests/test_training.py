"""Task training on real data (TREC question type) against the majority class and a linear probe."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from recast_core.artifact import read_artifact
from recast_core.backbone import TextBackbone
from recast_core.bank import TemplateBank
from recast_core.datasets import Splits, load_splits
from recast_core.errors import DataError
from recast_core.task_model import TextTaskModel, artifact_spec
from recast_core.training import TrainOptions, TrainResult, prepare_splits, train_task

# the default recipe (learning rate chosen on validation); the data capped so the test stays bounded
OPTIONS = TrainOptions(max_train_examples=600, seed=0)


@pytest.fixture(scope="module")
def trained(backbone: TextBackbone, default_bank: TemplateBank, trec: Splits) -> TrainResult:
    return train_task(
        backbone, default_bank, trec.train, val=trec.val, test=trec.test, options=OPTIONS, progress=False
    )


def _probe_test_accuracy(backbone: TextBackbone, trec: Splits) -> float:
    """Logistic regression on the ORIGINAL backbone's frozen mean-pooled embeddings, same splits."""
    train, val, _ = prepare_splits(trec.train, trec.val, trec.test, OPTIONS)
    embed = {
        name: backbone.embed(split.texts).numpy()
        for name, split in (("train", train), ("val", val), ("test", trec.test))
    }
    best = max(
        (
            LogisticRegression(C=c, max_iter=2000).fit(embed["train"], train.labels)
            for c in (0.1, 1.0, 10.0, 100.0)
        ),
        key=lambda clf: float((clf.predict(embed["val"]) == np.array(val.labels)).mean()),
    )
    return float((best.predict(embed["test"]) == np.array(trec.test.labels)).mean())


@pytest.mark.slow
def test_task_beats_majority_and_linear_probe(
    backbone: TextBackbone, trec: Splits, trained: TrainResult
) -> None:
    summary = trained.summary
    majority = Counter(trec.test.labels).most_common(1)[0][1] / len(trec.test)
    probe = _probe_test_accuracy(backbone, trec)
    assert summary["test_accuracy"] > majority + 0.4
    assert summary["test_accuracy"] >= probe, (summary["test_accuracy"], probe)
    assert summary["val_accuracy"] > summary["probe_val_accuracy"], "the defaults must beat the probe"
    assert summary["lr"] in OPTIONS.lr_grid and len(summary["lr_trials"]) == len(OPTIONS.lr_grid)
    assert abs(summary["train_examples"] - 600) <= 6  # the cap, stratified per class (6 classes)
    assert summary["test_examples"] == len(trec.test)
    # the backbone changed through its 48 coefficients and the FFN edit (the default capacity) only
    artifact = trained.artifact
    assert summary["capacity"] == "ffn_edit" and artifact.edit is not None
    assert artifact.trainable_parameters == 48 + 2 * 6 * 384
    assert summary["best_epoch"] >= 1


@pytest.mark.slow
def test_defaults_beat_the_probe_on_a_second_task(backbone: TextBackbone, default_bank: TemplateBank) -> None:
    """The default recipe on another bundled task: coefficients and head trained beyond the probe's
    validation accuracy (a probe-initialised head with untouched coefficients would only tie it)."""
    splits = load_splits("tweet_sentiment")
    result = train_task(backbone, default_bank, splits.train, val=splits.val, options=OPTIONS, progress=False)
    summary = result.summary
    assert summary["val_accuracy"] > summary["probe_val_accuracy"], summary
    assert summary["best_epoch"] >= 1 and summary["lr"] in OPTIONS.lr_grid


@pytest.mark.slow
def test_artifact_reloads_to_the_same_predictions(
    backbone: TextBackbone, default_bank: TemplateBank, trec: Splits, trained: TrainResult
) -> None:
    spec = artifact_spec(default_bank, backbone.hidden_size)
    artifact = read_artifact(trained.artifact.to_bytes(), spec)
    model = TextTaskModel.from_artifact(backbone, default_bank, artifact)
    texts = list(trec.test.texts)
    predictions = model.predict(texts)
    accuracy = float(np.mean([p.label == y for p, y in zip(predictions, trec.test.labels, strict=True)]))
    assert accuracy == pytest.approx(trained.summary["test_accuracy"], abs=1e-6)
    assert all(abs(sum(p.scores.values()) - 1) < 1e-5 for p in predictions[:20])
    # the bank's base coefficients are the plain backbone: the trained task really moved them
    base = default_bank.base_coefficients.mean(dim=1)
    assert float((artifact.coefficients - base).abs().max()) > 1e-3


def test_same_seed_gives_identical_tensors(
    backbone: TextBackbone, default_bank: TemplateBank, trec: Splits
) -> None:
    options = TrainOptions(epochs=1, max_train_examples=160, seed=7)
    small = trec.train.subset(range(400))
    runs = [train_task(backbone, default_bank, small, options=options, progress=False) for _ in range(2)]
    first, second = (run.artifact for run in runs)
    assert torch.equal(first.coefficients, second.coefficients)
    assert torch.equal(first.head_weight, second.head_weight)
    assert torch.equal(first.head_bias, second.head_bias)
    assert runs[0].history == runs[1].history
    other = train_task(
        backbone, default_bank, small, options=dataclasses.replace(options, seed=8), progress=False
    )
    assert other.history[1]["train_loss"] != runs[0].history[1]["train_loss"]  # the seed matters


def test_training_refuses_bad_splits(
    backbone: TextBackbone, default_bank: TemplateBank, trec: Splits
) -> None:
    one_class = trec.train.subset([i for i, y in enumerate(trec.train.labels) if y == "HUM"][:20])
    with pytest.raises(DataError, match="at least 2 classes"):
        train_task(backbone, default_bank, one_class, progress=False)
    rare = trec.train.subset([0, 1, 2, 3, *[i for i, y in enumerate(trec.train.labels) if y == "ABBR"][:1]])
    with pytest.raises(DataError):
        train_task(backbone, default_bank, rare, progress=False)


def test_training_another_task_forgets_nothing(
    backbone: TextBackbone, default_bank: TemplateBank, trec: Splits
) -> None:
    """Tasks share the bank and the backbone; training a second task must leave the first bit-identical."""
    from recast_core.datasets import load_splits

    options = TrainOptions(epochs=1, max_train_examples=128, seed=0, lr=3e-2)  # no learning-rate trials
    probe_texts = list(trec.test.texts[:64])
    first = train_task(backbone, default_bank, trec.train, options=options, progress=False).artifact
    before = TextTaskModel.from_artifact(backbone, default_bank, first).logits(probe_texts)
    templates = {k: v.clone() for k, v in default_bank.templates.items()}
    backbone_state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    spam = load_splits("sms_spam")
    second = train_task(backbone, default_bank, spam.train, options=options, progress=False).artifact
    assert second.labels == ("ham", "spam")
    after = TextTaskModel.from_artifact(backbone, default_bank, first).logits(probe_texts)
    assert torch.equal(before, after)
    assert all(torch.equal(templates[k], default_bank.templates[k]) for k in templates)
    assert all(torch.equal(backbone_state[k], v) for k, v in backbone.model.state_dict().items())


def test_coef_lr_sets_the_coefficients_rate_beside_the_edit(
    backbone: TextBackbone, default_bank: TemplateBank, trec: Splits
) -> None:
    """With coef_lr, the coefficients train at their own rate and the FFN edit at lr: a vanishing coef_lr
    leaves the coefficients where the bank starts them while the edit moves; without an edit, lr rules."""
    small = trec.train.subset(range(300))
    base = default_bank.base_coefficients.mean(dim=1)
    options = TrainOptions(epochs=1, max_train_examples=96, seed=0, lr=3e-2, coef_lr=1e-12)
    edited = train_task(backbone, default_bank, small, options=options, progress=False).artifact
    assert edited.edit is not None
    assert float((edited.coefficients - base).abs().max()) < 1e-6
    scale, shift = edited.edit
    assert float((scale - 1).abs().max()) > 1e-3 and float(shift.abs().max()) > 1e-3
    alone = dataclasses.replace(options, capacity="coefficients")  # coef_lr applies beside an edit only
    plain = train_task(backbone, default_bank, small, options=alone, progress=False).artifact
    assert float((plain.coefficients - base).abs().max()) > 1e-3


def test_coef_lr_must_be_positive() -> None:
    from recast_core.errors import ConfigError

    with pytest.raises(ConfigError, match="coef_lr must be > 0"):
        TrainOptions(coef_lr=0.0)
