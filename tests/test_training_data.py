"""Training requests as the API parses them (server/training/data.py): strict JSON, CSV headers, bounds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.errors import BadInput
from server.training.data import TrainingOptions, from_csv, from_json, parse_options

EXAMPLES = [{"text": "a b", "label": "x"}, {"text": "c d", "label": "y"}]


def _refusal(body: dict[str, Any]) -> str:
    with pytest.raises(BadInput) as refused:
        from_json(json.dumps(body).encode())
    return refused.value.message


@pytest.mark.parametrize(
    ("example", "field"),
    [
        ({"text": "a b", "label": True}, "label"),  # not "1"
        ({"text": "a b", "label": 1}, "label"),  # labels are class names: JSON strings
        ({"text": "a b", "label": None}, "label"),
        ({"text": 5, "label": "x"}, "text"),
        ({"text": True, "label": "x"}, "text"),
    ],
)
def test_texts_and_labels_must_be_json_strings(example: dict[str, Any], field: str) -> None:
    message = _refusal({"examples": [*EXAMPLES, example]})
    assert f"examples.2.{field}" in message and "string" in message


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"lr": "1e-3"}, "lr"),  # a string is not a number
        ({"epochs": "3"}, "epochs"),
        ({"epochs": True}, "epochs"),  # a boolean is not an integer
        ({"seed": False}, "seed"),
        ({"epochs": 2.5}, "epochs"),
        ({"val_fraction": True}, "val_fraction"),
    ],
)
def test_options_must_be_json_numbers(options: dict[str, Any], field: str) -> None:
    message = _refusal({"examples": EXAMPLES, "options": options})
    assert f"options.{field}" in message


def test_numbers_of_either_json_kind_where_a_float_is_expected() -> None:
    _, options = from_json(json.dumps({"examples": EXAMPLES, "options": {"lr": 1, "head_lr": 1e-3}}).encode())
    assert (options.lr, options.head_lr) == (1.0, 1e-3)
    data, _ = from_json(json.dumps({"examples": EXAMPLES}).encode())
    assert data.labels == ("x", "y")


@pytest.mark.parametrize(
    ("name", "low", "high"), [("epochs", 1, 50), ("max_length", 8, 512), ("seed", 0, 2**31 - 1)]
)
def test_option_bounds_are_enforced_and_in_the_schema(name: str, low: int, high: int) -> None:
    assert getattr(parse_options({name: low}), name) == low
    assert getattr(parse_options({name: high}), name) == high
    for value in (low - 1, high + 1):
        with pytest.raises(BadInput, match=name):
            parse_options({name: value})
    schema = TrainingOptions.model_json_schema()["properties"][name]
    assert (schema["minimum"], schema["maximum"]) == (low, high)


@pytest.mark.parametrize(
    ("header", "duplicate"),
    [("text,text,label", "text"), ("text,label,label", "label"), ("text,label,note,note", "note")],
)
def test_a_csv_header_naming_a_column_twice_is_refused(header: str, duplicate: str) -> None:
    columns = header.count(",") + 1
    body = f"{header}\n" + "\n".join(",".join(["a b", "x", "z", "w"][:columns]) for _ in range(4))
    with pytest.raises(BadInput) as refused:
        from_csv(body.encode(), "text", "label")
    assert repr(duplicate) in refused.value.message and "more than once" in refused.value.message


def test_a_csv_with_distinct_columns_is_read() -> None:
    data = from_csv(b"label,text,note\nx,a b,1\ny,c d,2\n", "text", "label")
    assert (data.texts, data.labels) == (("a b", "c d"), ("x", "y"))


def test_the_api_defaults_and_capacities_are_the_training_codes() -> None:
    from typing import get_args

    from recast_core.train_options import CAPACITIES, POOLINGS, TrainOptions

    assert get_args(TrainingOptions.model_fields["capacity"].annotation) == CAPACITIES
    assert get_args(TrainingOptions.model_fields["pooling"].annotation) == POOLINGS
    core = TrainOptions()
    defaults = TrainingOptions()
    for name in TrainingOptions.model_fields:
        assert getattr(defaults, name) == getattr(core, name), name
    body = {"examples": EXAMPLES, "options": {"capacity": "ffn_edit"}}
    assert from_json(json.dumps(body).encode())[1].capacity == "ffn_edit"
    assert "capacity" in _refusal({"examples": EXAMPLES, "options": {"capacity": "lora"}})
