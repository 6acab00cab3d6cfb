"""Training more tasks never changes an earlier task's predictions (server registry + predictor), whatever
parts their artifacts carry (coefficients alone, with the FFN scale and shift, with the query-pool head)."""

from __future__ import annotations

import pytest

from benchmarks.forgetting import run


@pytest.mark.slow
def test_earlier_tasks_are_bit_identical_after_training_more() -> None:
    # a fixed learning rate: the choice of one on validation is tested in test_training.py
    parts = (("coefficients", "mean"), ("ffn_edit", "mean"), ("ffn_edit", "query"))
    result = run(
        ("trec", "sms_spam", "tweet_sentiment"),
        max_train=200,
        epochs=1,
        max_length=32,
        probe=24,
        lr=3e-2,
        parts=parts,
    )
    assert result["parts"] == {
        "trec": {"capacity": "coefficients", "pooling": "mean"},
        "sms_spam": {"capacity": "ffn_edit", "pooling": "mean"},
        "tweet_sentiment": {"capacity": "ffn_edit", "pooling": "query"},
    }
    assert [(c["after_training"], c["task"]) for c in result["checks"]] == [
        ("trec", "trec"),
        ("sms_spam", "trec"),
        ("sms_spam", "sms_spam"),
        ("tweet_sentiment", "trec"),
        ("tweet_sentiment", "sms_spam"),
        ("tweet_sentiment", "tweet_sentiment"),
    ]
    for check in result["checks"]:
        assert check["logits_identical"] and check["artifact_identical"], check
        assert check["max_abs_diff"] == 0.0
    assert result["all_identical"]
    # the three kinds of task in one mixed batch give each task's own logits (up to batch-shape rounding)
    assert result["mixed_batch_max_abs_diff"] < 1e-4
