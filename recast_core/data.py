"""Labelled text data from CSV (header row) or JSONL files, and seeded stratified splits."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recast_core.errors import DataError

MAX_FILE_BYTES = 256 << 20


@dataclass(frozen=True)
class LabelledTexts:
    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        return LabelledTexts(tuple(self.texts[i] for i in indices), tuple(self.labels[i] for i in indices))

    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def to_csv(self, path: Path, text_column: str = "text", label_column: str = "label") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([text_column, label_column])
            writer.writerows(zip(self.texts, self.labels, strict=True))


def _label(value: object, where: str, column: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{where}: label {column!r} must be a string or an integer, got {value!r}")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: label {column!r} is empty")
    return text


def load_labelled(path: Path, text_column: str = "text", label_column: str = "label") -> LabelledTexts:
    """Read a .csv (with a header row) or .jsonl file; every problem is one DataError naming file and row."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from exc
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv or .jsonl")
    return parse_labelled(content, suffix[1:], str(path), text_column, label_column)


def parse_labelled(
    content: str, kind: str, source: str, text_column: str = "text", label_column: str = "label"
) -> LabelledTexts:
    """Labelled texts from CSV (`kind` "csv", a header row) or JSON Lines ("jsonl") text; every problem
    is one DataError naming `source` and the row."""
    if not content.strip():
        raise DataError(f"{source}: no data (empty)")
    if kind == "csv":
        texts, labels = _read_csv(source, content, text_column, label_column)
    elif kind == "jsonl":
        texts, labels = _read_jsonl(source, content, text_column, label_column)
    else:
        raise DataError(f"{source}: unsupported data format {kind!r}; use csv or jsonl")
    if not texts:
        raise DataError(f"{source}: no examples (only a header?)")
    return LabelledTexts(tuple(texts), tuple(labels))


def _read_csv(path: str, content: str, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    columns = reader.fieldnames or []
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the header has {columns}")
    texts: list[str] = []
    labels: list[str] = []
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            text = row.get(text_column)
            if text is None or not text.strip():
                raise DataError(f"{where}: empty text in column {text_column!r}")
            texts.append(text)
            labels.append(_label(row.get(label_column) or "", where, label_column))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc
    return texts, labels


def _read_jsonl(path: str, content: str, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    texts: list[str] = []
    labels: list[str] = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        missing = [c for c in (text_column, label_column) if c not in obj]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}; the object has {sorted(obj)}")
        text = obj[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: {text_column!r} must be a non-empty string")
        texts.append(text)
        labels.append(_label(obj[label_column], where, label_column))
    return texts, labels


def require_classes(
    data: LabelledTexts, minimum_per_class: int = 1, source: str = "training data"
) -> list[str]:
    """The sorted class list; at least two classes, each with `minimum_per_class` examples."""
    counts = Counter(data.labels)
    if len(counts) < 2:
        found = next(iter(counts), None)
        raise DataError(f"{source} needs at least 2 classes, found {len(counts)} ({found!r})")
    rare = sorted(label for label, count in counts.items() if count < minimum_per_class)
    if rare:
        raise DataError(
            f"{source}: class(es) {rare[:10]} have fewer than {minimum_per_class} examples, "
            "too few to carve a validation split"
        )
    return sorted(counts)


def stratified_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded stratified split: (kept indices, held-out indices), each class held out in `fraction`
    (at least one example per class when it has two or more)."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    kept: list[int] = []
    held: list[int] = []
    for label in sorted(by_class):
        idx = np.array(by_class[label])
        rng.shuffle(idx)
        k = round(len(idx) * fraction)
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held.extend(int(i) for i in idx[:k])
        kept.extend(int(i) for i in idx[k:])
    return sorted(kept), sorted(held)


def stratified_cap(labels: Sequence[str], cap: int, seed: int) -> list[int]:
    """At most `cap` indices, keeping the class proportions (seeded)."""
    if cap >= len(labels):
        return list(range(len(labels)))
    kept, _ = stratified_split(labels, 1.0 - cap / len(labels), seed)
    return kept
