from __future__ import annotations

import torch

from recast_core.image_data import digits_splits, fashion_splits


def test_fashion_splits_keep_the_official_test_split_and_remap_classes() -> None:
    splits = fashion_splits(range(5, 10))
    assert splits.train.classes == ("sandal", "shirt", "sneaker", "bag", "ankle-boot")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (27000, 3000, 5000)
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert float(splits.train.images.min()) >= 0.0 and float(splits.train.images.max()) <= 1.0
    assert torch.equal(torch.bincount(splits.test.targets), torch.full((5,), 1000))
    again = fashion_splits(range(5, 10))
    assert torch.equal(splits.val.images, again.val.images)


def test_digits_are_upsampled_and_split_once() -> None:
    splits = digits_splits()
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert splits.test.images.shape[1:] == (1, 28, 28)
    assert set(splits.train.targets.tolist()) == set(range(10))
    assert torch.equal(splits.test.targets, digits_splits().test.targets)
