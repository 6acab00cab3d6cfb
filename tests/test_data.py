from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from recast_core.data import load_labelled, require_classes, stratified_cap, stratified_split
from recast_core.datasets import load_splits
from recast_core.errors import DataError


def test_csv_and_jsonl_with_string_and_integer_labels(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\n"hello, world",pos\nbad day,neg\n', encoding="utf-8")
    data = load_labelled(csv_path)
    assert data.texts == ("hello, world", "bad day") and data.labels == ("pos", "neg")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"sentence": t, "y": y}) for t, y in [("a", 1), ("b", 0)]) + "\n")
    data = load_labelled(jsonl, text_column="sentence", label_column="y")
    assert data.labels == ("1", "0")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", b"", "empty"),
        ("header.csv", b"text,label\n", "no examples"),
        ("cols.csv", b"sentence,label\nhi,a\n", "missing column(s) ['text']"),
        ("latin.csv", "text,label\ncaf\xe9,a\n".encode("latin-1"), "not UTF-8"),
        ("bad.jsonl", b'{"text": "a", "label": 1}\nnot json\n', ":2: not valid JSON"),
        ("float.jsonl", b'{"text": "a", "label": 1.5}\n', "must be a string or an integer"),
        ("data.txt", b"text,label\na,b\n", "unsupported file type"),
    ],
)
def test_bad_files_get_one_clear_error(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_labelled(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_one_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.csv"
    path.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(DataError, match="at least 2 classes"):
        require_classes(load_labelled(path))


def test_stratified_split_is_seeded_and_keeps_proportions() -> None:
    labels = ["a"] * 80 + ["b"] * 20
    kept, held = stratified_split(labels, 0.25, seed=3)
    assert (kept, held) == stratified_split(labels, 0.25, seed=3)
    assert sorted(kept + held) == list(range(100))
    assert Counter(labels[i] for i in held) == {"a": 20, "b": 5}
    capped = stratified_cap(labels, 10, seed=0)
    assert Counter(labels[i] for i in capped) == {"a": 8, "b": 2}


def test_bundled_splits_are_fixed_and_disjoint() -> None:
    first, second = load_splits("trec"), load_splits("trec")
    assert first.test.texts == second.test.texts
    assert not set(first.train.texts) & set(first.test.texts)
    assert not set(first.val.texts) & set(first.test.texts)
    total = len(first.train) + len(first.val) + len(first.test)
    assert total == 5381 and set(first.train.labels) == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
