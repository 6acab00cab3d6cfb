"""What a training request may hold: labelled examples (JSON or CSV) and training options, checked up front.

Everything a job could fail on that can be seen before it runs is refused here with a 400 naming the
problem, so a queued job fails only for reasons of the training itself. JSON is taken as it is (strict
models): texts and labels are JSON strings, integers JSON integers, numbers JSON numbers; nothing is
coerced (`true` is no label "1", `"1e-3"` no learning rate). A CSV header names each column once.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recast_core.data import LabelledTexts, parse_labelled, require_classes
from recast_core.errors import DataError
from recast_core.train_options import TrainOptions
from server.errors import BadInput

MAX_CLASSES = 256
MAX_LABEL_CHARS = 200
# bounds of the options that can also be given as query parameters (job_routes.py)
EPOCHS = (1, 50)
MAX_LENGTH = (8, 512)
SEED = (0, 2**31 - 1)
STRICT = ConfigDict(extra="forbid", strict=True)


class Example(BaseModel):
    model_config = STRICT
    text: str = Field(min_length=1, description="the input text")
    label: str = Field(description="its class name")


CORE = TrainOptions()  # the API's defaults are the training code's


class TrainingOptions(BaseModel):
    """Training options (the server's defaults when omitted)."""

    model_config = STRICT
    epochs: int = Field(default=CORE.epochs, ge=EPOCHS[0], le=EPOCHS[1])
    batch_size: int = Field(default=CORE.batch_size, ge=1, le=256)
    lr: float | None = Field(
        default=CORE.lr,
        gt=0,
        le=1,
        description="learning rate of the coefficients; null (the default): chosen on the validation split "
        f"from {', '.join(f'{lr:g}' for lr in CORE.lr_grid)} by {CORE.select_epochs}-epoch trials",
    )
    coef_lr: float | None = Field(
        default=CORE.coef_lr,
        gt=0,
        le=1,
        description="the coefficients' own learning rate when the task also trains an FFN edit or a "
        "pooling query (lr is then those parts' rate); null: "
        + ("the same as lr" if CORE.coef_lr is None else f"default {CORE.coef_lr:g}"),
    )
    head_lr: float = Field(
        default=CORE.head_lr, gt=0, le=1, description="learning rate of the classifier head"
    )
    select_epochs: int = Field(
        default=CORE.select_epochs, ge=1, le=10, description="epochs of each learning-rate trial (lr null)"
    )
    max_length: int = Field(
        default=CORE.max_length, ge=MAX_LENGTH[0], le=MAX_LENGTH[1], description="tokens per text"
    )
    val_fraction: float = Field(
        default=CORE.val_fraction, ge=0.05, le=0.5, description="share held out for validation"
    )
    patience: int = Field(
        default=CORE.patience, ge=1, le=50, description="epochs without improvement before stopping"
    )
    seed: int = Field(default=CORE.seed, ge=SEED[0], le=SEED[1])
    capacity: Literal["coefficients", "ffn_edit"] = Field(
        default=cast(Any, CORE.capacity),
        description="what the task trains beside its head: the per-module coefficients, or those plus a "
        "per-channel scale and shift of every layer's FFN output (representation editing)",
    )
    pooling: Literal["mean", "query"] = Field(
        default=cast(Any, CORE.pooling),
        description="how the head pools the last hidden states: their mean, or attention with one learned "
        "query per task",
    )


class TrainRequest(BaseModel):
    model_config = STRICT
    examples: list[Example] = Field(min_length=1, description="labelled examples, at least 2 per class")
    options: TrainingOptions = Field(default_factory=TrainingOptions)


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ())) or 'body'}: {err.get('msg', 'invalid')}"
        for err in exc.errors()[:10]
    )


def parse_options(values: dict[str, Any]) -> TrainingOptions:
    try:
        return TrainingOptions.model_validate(values)
    except ValidationError as exc:
        raise BadInput(f"invalid training options: {_problems(exc)}") from None


def from_json(body: bytes) -> tuple[LabelledTexts, TrainingOptions]:
    try:
        request = TrainRequest.model_validate_json(body)
    except ValidationError as exc:
        raise BadInput(f"invalid training request: {_problems(exc)}") from None
    texts = tuple(e.text for e in request.examples)
    labels = tuple(e.label.strip() for e in request.examples)
    return LabelledTexts(texts, labels), request.options


def from_csv(body: bytes, text_column: str, label_column: str) -> LabelledTexts:
    try:
        content = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"the CSV is not UTF-8 (invalid byte at offset {exc.start})") from None
    try:
        header = next(csv.reader(io.StringIO(content, newline="")), [])
    except csv.Error:
        header = []  # malformed: parse_labelled says where
    twice = [name for name, n in Counter(header).items() if n > 1]
    if twice:
        names = ", ".join(repr(name) for name in twice)
        raise BadInput(f"the CSV header names column(s) {names} more than once; the header is {header}")
    try:
        return parse_labelled(content, "csv", "CSV", text_column, label_column)
    except DataError as exc:
        raise BadInput(str(exc)) from None


def check_examples(data: LabelledTexts, max_examples: int, max_chars: int) -> None:
    """Bounded size, bounded text length, 2 to MAX_CLASSES classes with at least 2 examples each."""
    if len(data) > max_examples:
        raise BadInput(f"{len(data)} examples; a training job takes at most {max_examples}")
    for i, (text, label) in enumerate(zip(data.texts, data.labels, strict=True)):
        if not text.strip():
            raise BadInput(f"example {i}: empty text")
        if len(text) > max_chars:
            raise BadInput(f"example {i}: {len(text)} characters; the limit is {max_chars}")
        if not label or len(label) > MAX_LABEL_CHARS:
            raise BadInput(f"example {i}: a label must have 1 to {MAX_LABEL_CHARS} characters")
    classes = data.classes()
    if len(classes) > MAX_CLASSES:
        raise BadInput(f"{len(classes)} classes; a task has at most {MAX_CLASSES}")
    try:
        require_classes(data, minimum_per_class=2, source="the examples")
    except DataError as exc:
        raise BadInput(str(exc)) from None


def options_dict(options: TrainingOptions) -> dict[str, Any]:
    """The options as recast_core TrainOptions keyword arguments (JSON-safe)."""
    return options.model_dump()
