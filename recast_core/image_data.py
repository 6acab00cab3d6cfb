"""Real image sets that install offline, as 28x28 grey tensors with fixed seeded splits.

- Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017): Debian package `dataset-fashion-mnist`, idx files under
  /usr/share/datasets/fashion-mnist/; the official test split is kept, validation is carved from train.
- digits (Alpaydin and Kaynak, UCI optical recognition of handwritten digits): scikit-learn's bundled
  `load_digits()`, 8x8 upsampled to 28x28.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recast_core.data import stratified_split
from recast_core.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
SPLIT_SEED = 20241125


@dataclass(frozen=True, eq=False)
class ImageSet:
    images: torch.Tensor  # (N, 1, 28, 28) float32 in [0, 1]
    targets: torch.Tensor  # (N,) int64 in [0, len(classes))
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, indices: Sequence[int]) -> ImageSet:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return ImageSet(self.images[idx], self.targets[idx], self.classes)


@dataclass(frozen=True, eq=False)
class ImageSplits:
    train: ImageSet
    val: ImageSet
    test: ImageSet


def _read_idx(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing; install the Debian package dataset-fashion-mnist")
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    dtype_code, dims = data[2], data[3]  # magic: two zero bytes, element type, number of dimensions
    if dtype_code != 0x08:
        raise DataError(f"{path}: unsupported idx element type 0x{dtype_code:02x}")
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion(part: str, classes: Sequence[int]) -> ImageSet:
    prefix = "train" if part == "train" else "t10k"
    images = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    keep = np.isin(labels, list(classes))
    remap = {c: i for i, c in enumerate(classes)}
    targets = torch.tensor([remap[int(y)] for y in labels[keep]])
    tensor = torch.from_numpy(images[keep].astype(np.float32) / 255.0).unsqueeze(1)
    return ImageSet(tensor, targets, tuple(FASHION_CLASSES[c] for c in classes))


def _split_val(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    kept, held = stratified_split([str(int(t)) for t in train.targets], fraction, seed)
    return train.subset(kept), train.subset(held)


def fashion_splits(classes: Sequence[int], val_fraction: float = 0.1) -> ImageSplits:
    train, val = _split_val(_fashion("train", classes), val_fraction, SPLIT_SEED)
    return ImageSplits(train=train, val=val, test=_fashion("test", classes))


def digits_splits() -> ImageSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    images = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    full = ImageSet(images, torch.tensor(bunch.target), tuple(str(d) for d in range(10)))
    labels = [str(int(t)) for t in full.targets]
    rest, test = stratified_split(labels, 0.2, SPLIT_SEED)
    rest_set = full.subset(rest)
    train, val = _split_val(rest_set, 0.125, SPLIT_SEED + 1)
    return ImageSplits(train=train, val=val, test=full.subset(test))
