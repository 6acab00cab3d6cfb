"""Hypothesis-generated corrupt task artifacts (tests/artifact_mutations.py): against the parser, and
uploaded to a real running server.

The parser must answer a valid artifact or raise its typed error; the server must answer a typed 4xx (or
accept a sample that is still a valid artifact and then serve it), never a 5xx, keep serving, leave the
tasks it was not sent to unchanged and keep no partial or rejected file in its store.
"""

from __future__ import annotations

import hashlib
import json
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
from artifact_mutations import MAX_UPLOAD, Base, Sample, corrupt_artifacts
from hypothesis import HealthCheck, example, given, settings
from safetensors.numpy import save as st_save
from server_harness import serving, task_artifact

from recast_core.artifact import CHECKSUM_KEY, ArtifactSpec, TaskArtifact, read_artifact
from recast_core.bank import TemplateBank
from recast_core.errors import ArtifactCorrupt, ArtifactError, ArtifactMetadataError
from server.api.openapi import error_types
from server.settings import Settings

OCTET = {"Content-Type": "application/octet-stream"}
FINGERPRINT = "ab" * 32
PROBE = ["Who wrote Hamlet?", "free entry in a weekly prize draw", "ok see you at 5"]
# error types of recast_core.errors: the `reason` of a 422 invalid_artifact
ARTIFACT_ERRORS: list[type[ArtifactError]] = [ArtifactError, *ArtifactError.__subclasses__()]
REASONS = {cls.error_type for cls in ARTIFACT_ERRORS}
STORED = re.compile(r"[0-9]{12}\.(safetensors|deleted)")
INDEX_FILE = re.compile(r"journal-[0-9]+|snapshot")  # the task index (server/stores/journal.py)
SETTINGS = settings(
    settings.get_profile("default"),  # not whatever profile another test module loaded: same samples always
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=20),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


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
    created="2026-01-01T00:00:00+00:00",  # fixed: the samples (and what they reach) must not vary by clock
)
UNIT_SPEC = ArtifactSpec(FINGERPRINT, num_slots=24, num_templates=2, hidden_size=384, max_bytes=MAX_UPLOAD)
UNIT_OUTCOMES: Counter[str] = Counter()


def _targeted(tensors: dict[str, np.ndarray] | None = None, checksum: bool = True, **metadata: str) -> Sample:
    """UNIT_ARTIFACT with some tensors or metadata replaced (its checksum kept consistent unless asked)."""
    base = Base.of(UNIT_ARTIFACT)
    base.tensors |= tensors or {}
    base.metadata |= metadata
    data = st_save(base.tensors, metadata=base.metadata)
    if checksum:
        (length,) = struct.unpack("<Q", data[:8])
        base.metadata[CHECKSUM_KEY] = hashlib.sha256(data[8 + length :]).hexdigest()
        data = st_save(base.tensors, metadata=base.metadata)
    return Sample(data, ["targeted"])


def _targeted_samples() -> list[Sample]:
    """One sample per check, run before the generated ones: every check is reached whatever the
    generator draws (the generated samples then explore around them)."""
    coefficients = UNIT_ARTIFACT.coefficients.numpy().copy()
    with_nan, huge = coefficients.copy(), UNIT_ARTIFACT.head_weight.numpy().copy()
    with_nan[0, 0], huge[0, 0] = np.nan, 3e38
    valid = UNIT_ARTIFACT.to_bytes()
    flipped = bytearray(valid)
    flipped[-3] ^= 0x01
    return [
        _targeted({"coefficients": np.zeros((24, 3), np.float32)}),
        _targeted(labels=json.dumps(["a", "b", "c"])),
        _targeted(bank_fingerprint="cd" * 32),
        _targeted({"coefficients": with_nan}),
        _targeted({"head.weight": huge}),
        _targeted({"coefficients": coefficients.astype(np.float16)}),
        _targeted({"extra": np.zeros(3, np.float32)}),
        _targeted(schema_version="9"),
        Sample(bytes(flipped), ["targeted"]),
        Sample(valid + bytes(MAX_UPLOAD), ["targeted"]),
        Sample(valid[:-10], ["targeted"]),
    ]


def _with_targeted_examples(test: Any) -> Any:
    for sample in _targeted_samples():
        test = example(sample=sample)(test)
    return test


@settings(SETTINGS, max_examples=600)
@_with_targeted_examples
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
        "artifact_values",
        "artifact_checksum",
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
    stray = [
        p
        for p in stored
        if p.name != ".lock"
        and not STORED.fullmatch(p.name)
        and not (p.parts[0] == ".index" and INDEX_FILE.fullmatch(p.name))
    ]
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
