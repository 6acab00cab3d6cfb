"""Training more tasks never changes an earlier task's predictions (server registry + predictor)."""

from __future__ import annotations

import pytest

from benchmarks.forgetting import run


@pytest.mark.slow
def test_earlier_tasks_are_bit_identical_after_training_more() -> None:
    # a fixed learning rate: the choice of one on validation is tested in test_training.py
    result = run(("trec", "sms_spam"), max_train=200, epochs=1, max_length=32, probe=24, lr=3e-2)
    assert [(c["after_training"], c["task"]) for c in result["checks"]] == [
        ("trec", "trec"),
        ("sms_spam", "trec"),
        ("sms_spam", "sms_spam"),
    ]
    for check in result["checks"]:
        assert check["logits_identical"] and check["artifact_identical"], check
        assert check["max_abs_diff"] == 0.0
    assert result["all_identical"]
    assert result["mixed_batch_max_abs_diff"] < 1e-4
