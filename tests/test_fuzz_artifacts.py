"""Hypothesis-generated corrupt task artifacts: against the parser, and uploaded to a real running server.

Every sample starts from a valid artifact's bytes and changes it on one or more layers: its tensors (shapes,
dtypes, NaN/Inf, missing or extra keys), its metadata (fingerprint, labels, training summary, schema
version), its safetensors header (offsets, sizes, dtypes, non-objects) and its raw bytes (bit flips,
truncation, header length field, garbage). The parser must answer a valid artifact or raise its typed
error; the server must answer a typed 4xx (or accept a sample that is still a valid artifact and then
serve it), never a 5xx, keep serving, leave the tasks it was not sent to unchanged and keep no partial
or rejected file in its store.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save
from server_harness import serving, task_artifact

from recast_core.artifact import KEYS, ArtifactSpec, TaskArtifact, read_artifact
from recast_core.bank import TemplateBank
from recast_core.errors import ArtifactCorrupt, ArtifactError, ArtifactMetadataError
from server.openapi import error_types
from server.settings import Settings

MAX_UPLOAD = 64 << 10
OCTET = {"Content-Type": "application/octet-stream"}
FINGERPRINT = "ab" * 32
PROBE = ["Who wrote Hamlet?", "free entry in a weekly prize draw", "ok see you at 5"]
NUMPY_DTYPES = (np.float16, np.float64, np.int64, np.int32, np.int8, np.uint8, np.bool_)
# error types of recast_core.errors: the `reason` of a 422 invalid_artifact
ARTIFACT_ERRORS: list[type[ArtifactError]] = [ArtifactError, *ArtifactError.__subclasses__()]
REASONS = {cls.error_type for cls in ARTIFACT_ERRORS}
STORED = re.compile(r"[0-9]{12}\.(safetensors|deleted)")
SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=20),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@dataclass
class Base:
    """A valid artifact, split into what the mutations work on."""

    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]

    @classmethod
    def of(cls, artifact: TaskArtifact) -> Base:
        raw = artifact.to_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        metadata = json.loads(raw[8 : 8 + length])["__metadata__"]
        tensors = {
            "coefficients": artifact.coefficients.numpy().copy(),
            "head.weight": artifact.head_weight.numpy().copy(),
            "head.bias": artifact.head_bias.numpy().copy(),
        }
        return cls(tensors, metadata)


@dataclass
class Sample:
    data: bytes
    steps: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Sample({len(self.data)} bytes: {'; '.join(self.steps)}; starts {self.data[:120]!r})"


# metadata values: strings safetensors can write (no lone surrogates in the outer header)
plain_text = st.text(st.characters(codec="utf-8"), max_size=40)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), plain_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(plain_text, inner, max_size=3),
    max_leaves=8,
)
deep_json = st.integers(1_000, 60_000).map(lambda depth: "[" * depth + "]" * depth)
# inside the labels and training JSON, escaped (\\ud800): lone surrogates decode to str but are not text
lone_surrogate = st.tuples(st.text(max_size=4), st.characters(categories=["Cs"]), st.text(max_size=4))
any_text = st.text(max_size=12) | lone_surrogate.map("".join)
label_lists = st.one_of(
    st.lists(st.text(max_size=300) | any_text, max_size=6),  # empty, duplicate, over-long labels
    st.lists(
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=8), min_size=2, max_size=6, unique=True
    ),
    st.integers(0, 4100).map(lambda n: [f"label-{i}" for i in range(n)]),
    st.lists(json_values, min_size=2, max_size=4),
)
METADATA_VALUES: dict[str, st.SearchStrategy[str]] = {
    "schema_version": st.sampled_from(["0", "2", "1.0", " 1", "", "01", "1\n"]) | plain_text,
    "bank_fingerprint": st.one_of(
        st.text("0123456789abcdef", min_size=64, max_size=64),
        st.text("0123456789abcdef", max_size=80),
        plain_text,
    ),
    "labels": st.one_of(label_lists.map(json.dumps), json_values.map(json.dumps), deep_json, plain_text),
    "training": st.one_of(
        st.dictionaries(plain_text, json_values, max_size=4).map(json.dumps),  # NaN, Infinity, surrogates
        st.dictionaries(any_text, any_text, max_size=3).map(json.dumps),
        json_values.map(json.dumps),
        deep_json.map(lambda nested: '{"x": ' + nested + "}"),
        plain_text,
    ),
    "created": plain_text,
}


@st.composite
def tensor_change(draw: st.DrawFn, base: Base, sample: Sample) -> None:
    key = draw(st.sampled_from([*KEYS, "extra"]))
    kind = draw(st.sampled_from(["shape", "dtype", "non_finite", "drop", "add"]))
    tensors = base.tensors
    if kind == "drop":
        tensors.pop(key, None)
    elif key == "extra" or key not in tensors:
        tensors[key] = np.zeros(3, np.float32)
    elif kind == "shape":
        shape = draw(st.lists(st.integers(0, 9), max_size=3)) or draw(
            st.sampled_from([[], list(tensors[key].shape)[::-1], [n + 1 for n in tensors[key].shape]])
        )
        tensors[key] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    elif kind == "dtype":
        with np.errstate(invalid="ignore"):
            tensors[key] = tensors[key].astype(draw(st.sampled_from(NUMPY_DTYPES)))
    elif kind == "non_finite" and tensors[key].dtype == np.float32 and tensors[key].size:
        flat = tensors[key].reshape(-1).copy()
        for index in draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=3)):
            flat[index] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tensors[key] = flat.reshape(tensors[key].shape)
    elif kind == "add":
        tensors[f"{key}.copy"] = tensors[key]
    sample.steps.append(f"tensor {key}: {kind}")


@st.composite
def metadata_change(draw: st.DrawFn, base: Base, sample: Sample) -> None:
    key = draw(st.sampled_from(["labels", "training", *sorted(METADATA_VALUES)]))  # the JSON ones twice
    if draw(st.integers(0, 5)) == 0:
        base.metadata.pop(key, None)
        sample.steps.append(f"metadata {key}: dropped")
    elif key == "labels" and "head.bias" in base.tensors and draw(st.booleans()):
        classes = base.tensors["head.bias"].shape[0] if base.tensors["head.bias"].ndim else 0
        labels = draw(st.lists(any_text, min_size=classes, max_size=classes))
        base.metadata[key] = json.dumps(
            labels
        )  # as many as the head has classes: only their text can be wrong
        sample.steps.append(f"metadata labels: {labels!r}")
    else:
        base.metadata[key] = draw(METADATA_VALUES[key])
        sample.steps.append(f"metadata {key}: {base.metadata[key][:80]!r}")


@st.composite
def header_change(draw: st.DrawFn, data: bytes, sample: Sample) -> bytes:
    """Rewrite the JSON header (the data section stays): offsets, shapes, dtypes, entry types."""
    (length,) = struct.unpack("<Q", data[:8])
    header: Any = json.loads(data[8 : 8 + length])
    key = draw(st.sampled_from(sorted(header)))
    huge = st.sampled_from([2**31, 2**32 + 5, 2**62, 2**63, 2**64 - 1, 2**64, 2**70])
    weird: st.SearchStrategy[Any] = st.sampled_from([None, True, -1, 1.5, "3", [], {}])
    kind = draw(st.sampled_from(["offsets", "shape", "dtype", "entry", "whole"]))
    entry = header[key]
    if kind == "offsets" and isinstance(entry, dict):
        entry["data_offsets"] = draw(
            st.lists(st.integers(-8, 4 * len(data)) | huge | weird, min_size=0, max_size=3)
        )
    elif kind == "shape" and isinstance(entry, dict):
        entry["shape"] = draw(st.lists(st.integers(0, 12) | huge | weird, max_size=4))
    elif kind == "dtype" and isinstance(entry, dict):
        entry["dtype"] = draw(
            st.sampled_from(["F16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X", ""]) | weird
        )
    elif kind == "whole":
        header = draw(st.sampled_from([[], "header", 7, None, {}]))
    else:
        header[key] = draw(json_values)
    sample.steps.append(f"header {key}: {kind}")
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


@st.composite
def byte_change(draw: st.DrawFn, data: bytes, sample: Sample) -> bytes:
    kind = draw(
        st.sampled_from(["flip", "truncate", "length", "splice", "append", "garbage", "nested", "oversize"])
    )
    if kind == "flip":
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            flipped[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        data = bytes(flipped)
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "length":
        (length,) = struct.unpack("<Q", data[:8])
        value = draw(
            st.sampled_from(
                [0, 1, length - 1, length + 1, len(data), len(data) + 1, 65_536, 2**40, 2**64 - 1]
            )
            | st.integers(0, 2**64 - 1)
        )
        data = struct.pack("<Q", value) + data[8:]
    elif kind == "splice":
        start = draw(st.integers(0, len(data)))
        end = draw(st.integers(start, min(len(data), start + 64)))
        data = data[:start] + draw(st.binary(max_size=64)) + data[end:]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=256))
    elif kind == "garbage":
        data = draw(st.binary(max_size=512))
    elif kind == "nested":
        depth = draw(st.integers(1_000, 30_000))
        nested = ("[" * depth + "]" * depth).encode()
        data = struct.pack("<Q", len(nested)) + nested
    else:
        data += bytes(MAX_UPLOAD)
    sample.steps.append(f"bytes: {kind}")
    return data


@st.composite
def corrupt_artifacts(draw: st.DrawFn, artifact: TaskArtifact) -> Sample:
    """A valid artifact changed on one to three layers: tensors/metadata, header, raw bytes."""
    base, sample = Base.of(artifact), Sample(b"")
    layer = st.sampled_from(["tensor", "metadata", "header", "bytes"])
    # half the samples change one layer once (and may still be valid), half stack changes on several
    layers = draw(layer.map(lambda name: [name]) | st.lists(layer, min_size=2, max_size=3, unique=True))
    for _ in range(draw(st.integers(1, len(layers))) if "tensor" in layers else 0):
        draw(tensor_change(base, sample))
    for _ in range(draw(st.integers(1, len(layers))) if "metadata" in layers else 0):
        draw(metadata_change(base, sample))
    data = st_save(base.tensors, metadata=base.metadata)
    if "header" in layers:
        data = draw(header_change(data, sample))
    if "bytes" in layers:
        data = draw(byte_change(data, sample))
    sample.data = data
    note(f"{sample.steps} ({len(data)} bytes)")
    return sample


def _check_valid(artifact: TaskArtifact, spec: ArtifactSpec) -> None:
    """What a successful parse promises."""
    assert tuple(artifact.coefficients.shape) == (spec.num_slots, spec.num_templates)
    assert tuple(artifact.head_weight.shape) == (len(artifact.labels), spec.hidden_size)
    assert tuple(artifact.head_bias.shape) == (len(artifact.labels),)
    for tensor in (artifact.coefficients, artifact.head_weight, artifact.head_bias):
        assert tensor.dtype == torch.float32 and bool(torch.isfinite(tensor).all())
    assert 2 <= len(set(artifact.labels)) == len(artifact.labels)
    assert artifact.bank_fingerprint == spec.bank_fingerprint
    # served back as JSON text (NaN in training is served as null)
    json.dumps([artifact.labels, artifact.training, artifact.created], ensure_ascii=False).encode("utf-8")


UNIT_ARTIFACT = TaskArtifact(
    coefficients=torch.randn(24, 2, generator=torch.Generator().manual_seed(0)),
    head_weight=torch.randn(2, 384, generator=torch.Generator().manual_seed(1)),
    head_bias=torch.zeros(2),
    labels=("negative", "positive"),
    bank_fingerprint=FINGERPRINT,
    training={"seed": 0},
)
UNIT_SPEC = ArtifactSpec(FINGERPRINT, num_slots=24, num_templates=2, hidden_size=384, max_bytes=MAX_UPLOAD)
UNIT_OUTCOMES: Counter[str] = Counter()


@settings(SETTINGS, max_examples=600)
@given(sample=corrupt_artifacts(UNIT_ARTIFACT))
def test_the_parser_accepts_a_valid_artifact_or_raises_its_typed_error(sample: Sample) -> None:
    try:
        artifact = read_artifact(sample.data, spec=UNIT_SPEC)
    except ArtifactError as exc:
        UNIT_OUTCOMES[exc.error_type] += 1
        assert str(exc) and exc.error_type in REASONS
        return
    UNIT_OUTCOMES["valid"] += 1
    _check_valid(artifact, UNIT_SPEC)
    assert read_artifact(artifact.to_bytes(), spec=UNIT_SPEC).labels == artifact.labels


def _with_metadata(**values: str) -> bytes:
    base = Base.of(UNIT_ARTIFACT)
    return st_save(base.tensors, metadata=base.metadata | values)


def _with_header(change: dict[str, Any]) -> bytes:
    data = UNIT_ARTIFACT.to_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["coefficients"] |= change
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


NESTED = "[" * 20_000 + "]" * 20_000
DEEP_TRAINING = '{"x": ' + "[" * 300 + "]" * 300 + "}"  # parses, but no JSON answer can render it


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (struct.pack("<Q", len(NESTED)) + NESTED.encode(), ArtifactCorrupt),  # was a raw RecursionError
        (_with_header({"dtype": ["F32"]}), ArtifactCorrupt),  # was a raw TypeError (unhashable dtype)
        (_with_metadata(labels=json.dumps(["ok", "\ud800"])), ArtifactMetadataError),  # was accepted
        (_with_metadata(training=json.dumps({"note": "\udfff"})), ArtifactMetadataError),  # was accepted
        (_with_metadata(labels=NESTED), ArtifactMetadataError),  # was a raw RecursionError
        (_with_metadata(training=DEEP_TRAINING), ArtifactMetadataError),  # was accepted
    ],
    ids=[
        "nested_header",
        "list_dtype",
        "surrogate_label",
        "surrogate_training",
        "nested_labels",
        "deep_training",
    ],
)
def test_found_by_fuzzing_each_raises_its_typed_error(data: bytes, error: type[ArtifactError]) -> None:
    with pytest.raises(error):
        read_artifact(data, spec=UNIT_SPEC)


def test_the_parser_outcomes_cover_every_check() -> None:
    if not UNIT_OUTCOMES:
        pytest.skip("run together with the parser property test")
    print(f"\nparser outcomes over {sum(UNIT_OUTCOMES.values())} samples: {dict(UNIT_OUTCOMES)}")
    expected = {
        "artifact_corrupt",
        "artifact_keys",
        "artifact_shape",
        "artifact_dtype",
        "artifact_non_finite",
    }
    expected |= {"artifact_metadata", "fingerprint_mismatch", "label_count_mismatch", "artifact_too_large"}
    assert expected <= set(UNIT_OUTCOMES), expected - set(UNIT_OUTCOMES)


# ---- against a real server ----------------------------------------------------------------------------


@dataclass
class Bystander:
    """A stored task no sample is sent to: its metadata and answers must never change."""

    detail: dict[str, Any]
    outputs: list[dict[str, Any]]


@dataclass
class FuzzServer:
    url: str
    http: httpx.Client
    store: Path
    base: TaskArtifact
    bystanders: dict[str, Bystander] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    accepted: int = 0

    def predict(self, task_id: str) -> httpx.Response:
        return self.http.post(f"/v1/tasks/{task_id}/predict", json={"inputs": PROBE})

    def check_bystander(self, task_id: str) -> None:
        answer = self.predict(task_id)
        assert answer.status_code == 200, answer.text
        want = self.bystanders[task_id].outputs
        got = answer.json()["outputs"]
        assert [o["label"] for o in got] == [o["label"] for o in want]
        for g, w in zip(got, want, strict=True):
            for label, score in w["scores"].items():
                assert abs(g["scores"][label] - score) < 1e-4


@pytest.fixture(scope="module")
def fuzz_server(
    bank_dir: Path, default_bank: TemplateBank, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzServer]:
    store = tmp_path_factory.mktemp("fuzz-artifacts") / "tasks"
    settings = Settings(
        bank=bank_dir,
        store=str(store),
        threads=2,
        max_wait_ms=1.0,
        max_length=16,
        max_upload_bytes=MAX_UPLOAD,
    )
    with serving(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        server = FuzzServer(url, http, store, task_artifact(default_bank, 21, labels=("low", "mid", "high")))
        for task_id, seed in (("keep-a", 22), ("keep-b", 23)):
            artifact = task_artifact(default_bank, seed, labels=("ham", "spam"))
            assert (
                http.put(f"/v1/tasks/{task_id}", content=artifact.to_bytes(), headers=OCTET).status_code
                == 201
            )
            detail = http.get(f"/v1/tasks/{task_id}").json()
            server.bystanders[task_id] = Bystander(detail, server.predict(task_id).json()["outputs"])
        yield server


def _upload(server: FuzzServer, sample: Sample, index: int) -> None:
    target = f"target-{index % 3}"
    answer = server.http.put(f"/v1/tasks/{target}", content=sample.data, headers=OCTET)
    status = answer.status_code
    assert status in (200, 201, 400, 413, 422), (status, answer.text)
    body = answer.json()
    if status >= 400:
        assert body["error_type"] in error_types(status) and body["error"], body
        reason = body.get("reason")
        server.statuses[f"{status} {body['error_type']}" + (f" ({reason})" if reason else "")] += 1
        assert status != 422 or reason in REASONS, body
        return
    # the mutation left a valid artifact: it is stored and served like any upload
    server.accepted += 1
    server.statuses[str(status)] += 1
    detail = server.http.get(f"/v1/tasks/{target}")
    assert detail.status_code == 200 and detail.json()["version"] == body["version"], detail.text
    answer = server.predict(target)
    assert answer.status_code == 200, answer.text
    for output in answer.json()["outputs"]:
        assert output["label"] in body["labels"] and set(output["scores"]) == set(body["labels"])
        assert abs(sum(output["scores"].values()) - 1.0) < 1e-3


def test_the_server_rejects_corrupt_uploads_with_typed_4xx_and_keeps_serving(
    fuzz_server: FuzzServer,
) -> None:
    server, counter = fuzz_server, iter(range(10**9))
    start = time.monotonic()

    @settings(SETTINGS, max_examples=200)
    @given(sample=corrupt_artifacts(server.base))
    def upload_one(sample: Sample) -> None:
        index = next(counter)
        _upload(server, sample, index)
        # after every sample the server still answers, and a task nobody sent anything to is unchanged
        server.check_bystander(("keep-a", "keep-b")[index % 2])

    upload_one()
    print(
        f"\n{next(counter)} uploads in {time.monotonic() - start:.1f} s, {server.accepted} accepted: "
        + ", ".join(f"{k} x{n}" for k, n in server.statuses.most_common())
    )
    for task_id, before in server.bystanders.items():
        server.check_bystander(task_id)
        assert server.http.get(f"/v1/tasks/{task_id}").json() == before.detail
    assert server.http.get("/readyz").status_code == 200
    stored = {path.relative_to(server.store) for path in server.store.rglob("*") if path.is_file()}
    stray = [p for p in stored if p.name != ".lock" and not STORED.fullmatch(p.name)]
    assert not stray, f"partial or stray files in the store: {stray}"
    for task_id in server.bystanders:
        assert [p.name for p in stored if p.parent.name == task_id] == [f"{1:012d}.safetensors"]
    slots, templates = server.base.coefficients.shape
    spec = ArtifactSpec(server.base.bank_fingerprint, slots, templates, hidden_size=384)
    for path in stored:
        if path.suffix == ".safetensors":  # only validated artifacts ever reach the store
            read_artifact(server.store / path, spec=spec)


@pytest.mark.parametrize(
    "metadata",
    [{"labels": json.dumps(["low", "\ud800", "high"])}, {"training": DEEP_TRAINING}],
    ids=["surrogate_label", "deep_training"],
)
def test_metadata_no_answer_can_render_is_rejected_not_stored(
    fuzz_server: FuzzServer, metadata: dict[str, str]
) -> None:
    """Such uploads used to be stored, then every answer naming the task (upload, get, list) was a 500."""
    base = Base.of(fuzz_server.base)
    data = st_save(base.tensors, metadata=base.metadata | metadata)
    answer = fuzz_server.http.put("/v1/tasks/unrenderable", content=data, headers=OCTET)
    assert answer.status_code == 422 and answer.json()["reason"] == "artifact_metadata", answer.text
    assert fuzz_server.http.get("/v1/tasks/unrenderable").status_code == 404
    assert fuzz_server.http.get("/v1/tasks").status_code == 200
    assert not (fuzz_server.store / "unrenderable").exists()
