"""Task artifacts: exact round trip, and one typed error per kind of corruption."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from recast_core.artifact import ArtifactSpec, TaskArtifact, read_artifact, serialize
from recast_core.errors import (
    ArtifactChecksumMismatch,
    ArtifactCorrupt,
    ArtifactDtypeError,
    ArtifactError,
    ArtifactKeyError,
    ArtifactMetadataError,
    ArtifactNonFinite,
    ArtifactShapeError,
    ArtifactTooLarge,
    ArtifactValueError,
    FingerprintMismatch,
    LabelCountMismatch,
)

FP = "ab" * 32
SPEC = ArtifactSpec(bank_fingerprint=FP, num_slots=24, num_templates=2, hidden_size=384)
LABELS = ("ham", "spam", "other")


def _artifact() -> TaskArtifact:
    g = torch.Generator().manual_seed(0)
    return TaskArtifact(
        coefficients=torch.randn(24, 2, generator=g),
        head_weight=torch.randn(3, 384, generator=g),
        head_bias=torch.randn(3, generator=g),
        labels=LABELS,
        bank_fingerprint=FP,
        training={"val_accuracy": 0.9},
    )


def _raw(tensors: dict[str, torch.Tensor] | None = None, **meta: str) -> bytes:
    art = _artifact()
    base = {"coefficients": art.coefficients, "head.weight": art.head_weight, "head.bias": art.head_bias}
    metadata = {
        "schema_version": "1",
        "bank_fingerprint": FP,
        "labels": json.dumps(list(LABELS)),
        "created": "2026-01-01T00:00:00+00:00",
        "training": "{}",
    }
    metadata.update(meta)
    return bytes(st_save(tensors if tensors is not None else base, metadata=metadata))


def test_round_trip_is_exact(tmp_path: Path) -> None:
    art = _artifact()
    path = tmp_path / "task.safetensors"
    size = art.save(path)
    assert size == path.stat().st_size < 8 * 1024
    for source in (path, path.read_bytes()):
        loaded = read_artifact(source, SPEC)
        assert torch.equal(loaded.coefficients, art.coefficients)
        assert torch.equal(loaded.head_weight, art.head_weight)
        assert torch.equal(loaded.head_bias, art.head_bias)
        assert loaded.labels == art.labels
        assert loaded.training == art.training
        assert loaded.created == art.created
        assert loaded.to_bytes() == art.to_bytes()
    assert art.trainable_parameters == 48
    assert art.head_parameters == 3 * 385


def _tensors(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    art = _artifact()
    base: dict[str, torch.Tensor] = {
        "coefficients": art.coefficients,
        "head.weight": art.head_weight,
        "head.bias": art.head_bias,
    }
    for key, value in changes.items():
        name = key.replace("_", ".", 1) if key.startswith("head_") else key
        if value is None:
            del base[name]
        else:
            base[name] = value
    return base


def _nan_coefficients() -> dict[str, torch.Tensor]:
    c = _artifact().coefficients.clone()
    c[3, 1] = float("nan")
    return _tensors(coefficients=c)


def _inf_head() -> dict[str, torch.Tensor]:
    w = _artifact().head_weight.clone()
    w[0, 0] = float("inf")
    return _tensors(head_weight=w)


def _huge_header() -> bytes:
    return struct.pack("<Q", 10**9) + b"{}"


CASES = [
    ("wrong fingerprint", lambda: _raw(bank_fingerprint="cd" * 32), FingerprintMismatch),
    ("missing key", lambda: _raw(_tensors(head_bias=None)), ArtifactKeyError),
    ("extra key", lambda: _raw(_tensors() | {"extra": torch.zeros(1)}), ArtifactKeyError),
    ("NaN", lambda: _raw(_nan_coefficients()), ArtifactNonFinite),
    ("Inf", lambda: _raw(_inf_head()), ArtifactNonFinite),
    ("wrong coefficient shape", lambda: _raw(_tensors(coefficients=torch.zeros(24, 3))), ArtifactShapeError),
    ("wrong hidden size", lambda: _raw(_tensors(head_weight=torch.zeros(3, 128))), ArtifactShapeError),
    (
        "wrong dtype",
        lambda: _raw(_tensors(coefficients=torch.zeros(24, 2, dtype=torch.float16))),
        ArtifactDtypeError,
    ),
    ("label count", lambda: _raw(labels=json.dumps(["a", "b"])), LabelCountMismatch),
    ("schema version", lambda: _raw(schema_version="99"), ArtifactMetadataError),
    ("labels not JSON", lambda: _raw(labels="[oops"), ArtifactMetadataError),
    ("truncated", lambda: _raw()[:-100], ArtifactCorrupt),
    ("truncated header", lambda: _raw()[:40], ArtifactCorrupt),
    ("empty", lambda: b"", ArtifactCorrupt),
    ("not safetensors", lambda: b"hello world, not a tensor file", ArtifactCorrupt),
    ("huge header", _huge_header, ArtifactCorrupt),
    ("oversize", lambda: _raw() + b"\0" * (2 << 20), ArtifactTooLarge),
]


@pytest.mark.parametrize(("case", "make", "error"), CASES, ids=[c[0] for c in CASES])
def test_corrupt_artifacts_raise_their_typed_error(case: str, make, error: type[ArtifactError]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as info:
        read_artifact(make(), SPEC)
    assert type(info.value) is error
    assert info.value.error_type != ArtifactError.error_type
    assert str(info.value)


def test_errors_name_expected_and_found() -> None:
    with pytest.raises(ArtifactShapeError) as info:
        read_artifact(_raw(_tensors(coefficients=torch.zeros(24, 3))), SPEC)
    assert info.value.expected == (24, 2) and info.value.found == (24, 3)
    assert "expected (24, 2), found (24, 3)" in str(info.value)
    with pytest.raises(ArtifactKeyError) as keys:
        read_artifact(_raw(_tensors(head_bias=None)), SPEC)
    assert "head.bias" in str(keys.value)


def test_oversize_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    path.write_bytes(b"\0" * (SPEC.max_bytes + 1))
    with pytest.raises(ArtifactTooLarge):
        read_artifact(path, SPEC)


BOUNDED_SPEC = ArtifactSpec(FP, 24, 2, 384, embedding_bound=15.6)


def _metadata_of(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    metadata: dict[str, str] = json.loads(data[8 : 8 + length])["__metadata__"]
    return metadata


def test_written_artifacts_carry_a_checksum_of_their_tensor_data() -> None:
    data = _artifact().to_bytes()
    metadata = _metadata_of(data)
    assert metadata["schema_version"] == "3"
    (length,) = struct.unpack("<Q", data[:8])
    assert metadata["tensor_sha256"] == hashlib.sha256(data[8 + length :]).hexdigest()
    assert read_artifact(data, BOUNDED_SPEC).labels == LABELS


def test_a_bit_flip_in_the_tensor_data_is_refused() -> None:
    data = bytearray(_artifact().to_bytes())
    data[-5] ^= 0x04  # inside head.weight: still a finite float32, so only the checksum can tell
    with pytest.raises(ArtifactChecksumMismatch) as info:
        read_artifact(bytes(data), BOUNDED_SPEC)
    assert info.value.error_type == "artifact_checksum"


def test_schema_1_artifacts_without_a_checksum_still_load() -> None:
    loaded = read_artifact(_raw(), BOUNDED_SPEC)
    assert loaded.schema_version == 1 and loaded.labels == LABELS


def test_schema_2_requires_the_checksum() -> None:
    with pytest.raises(ArtifactMetadataError, match="tensor_sha256"):
        read_artifact(_raw(schema_version="2"), BOUNDED_SPEC)


HOSTILE_METADATA = [
    ("huge integer", {"training": '{"n": ' + "9" * 5000 + "}"}, "'training'"),
    ("huge integer in labels", {"labels": "[" + "1" * 4400 + "]"}, "'labels'"),
    ("NaN constant", {"training": '{"x": NaN}'}, "'training'"),
    ("float overflow", {"training": '{"x": 1e999}'}, "'training'"),
    ("50 KB created", {"created": "2026-01-01T00:00:00" + "0" * 50_000}, "'created'"),
    ("created not a time", {"created": "yesterday"}, "'created'"),
    ("fingerprint not hex", {"bank_fingerprint": "zz" * 32}, "'bank_fingerprint'"),
]


@pytest.mark.parametrize(("case", "meta", "field"), HOSTILE_METADATA, ids=[c[0] for c in HOSTILE_METADATA])
def test_hostile_metadata_is_a_typed_error_naming_the_field(
    case: str, meta: dict[str, str], field: str
) -> None:
    with pytest.raises(ArtifactMetadataError) as info:
        read_artifact(_raw(**meta), ArtifactSpec(FP, 24, 2, 384, max_bytes=1 << 20))
    assert field in str(info.value)


def test_a_numeric_schema_version_says_it_must_be_a_string() -> None:
    art = _artifact()
    tensors = {"coefficients": art.coefficients, "head.weight": art.head_weight, "head.bias": art.head_bias}
    data = bytearray(_raw(tensors))
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["schema_version"] = 1  # a JSON number: safetensors' own writer cannot make this
    encoded = json.dumps(header).encode()
    raw = struct.pack("<Q", len(encoded)) + encoded + bytes(data[8 + length :])
    with pytest.raises(ArtifactMetadataError) as info:
        read_artifact(raw, SPEC)
    assert "'schema_version' must be a string" in str(info.value)
    assert "found int" in str(info.value)


def test_finite_but_huge_values_are_refused() -> None:
    head = _artifact().head_weight.clone()
    head[1, 7] = 3e38
    with pytest.raises(ArtifactValueError, match="logits"):
        read_artifact(_raw(_tensors(head_weight=head)), BOUNDED_SPEC)
    with pytest.raises(ArtifactValueError, match="head value"):  # no embedding bound known: per value
        read_artifact(_raw(_tensors(head_weight=head)), SPEC)
    coefficients = _artifact().coefficients.clone()
    coefficients[0, 0] = 1e20
    with pytest.raises(ArtifactValueError, match="coefficient"):
        read_artifact(_raw(_tensors(coefficients=coefficients)), BOUNDED_SPEC)
    assert read_artifact(_raw(), BOUNDED_SPEC).labels == LABELS  # ordinary trained values pass


EDIT_SPEC = ArtifactSpec(
    bank_fingerprint=FP, num_slots=24, num_templates=2, hidden_size=384, edit_shape=(6, 384)
)


def _edited(scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> TaskArtifact:
    g = torch.Generator().manual_seed(1)
    art = _artifact()
    return TaskArtifact(
        coefficients=art.coefficients,
        head_weight=art.head_weight,
        head_bias=art.head_bias,
        labels=art.labels,
        bank_fingerprint=FP,
        training=art.training,
        ffn_scale=scale if scale is not None else 1 + 0.1 * torch.randn(6, 384, generator=g),
        ffn_shift=shift if shift is not None else 0.1 * torch.randn(6, 384, generator=g),
    )


def _signed(tensors: dict[str, torch.Tensor], schema: str = "3") -> bytes:
    metadata = {
        "schema_version": schema,
        "bank_fingerprint": FP,
        "labels": json.dumps(list(LABELS)),
        "created": "2026-01-01T00:00:00+00:00",
        "training": "{}",
    }
    return serialize(tensors, metadata, checksum=True)


def test_an_ffn_edit_round_trips_exactly_and_counts_as_trainable() -> None:
    art = _edited()
    data = art.to_bytes()
    loaded = read_artifact(data, EDIT_SPEC)
    assert loaded.schema_version == 3 and loaded.edit is not None and art.edit is not None
    assert torch.equal(loaded.edit[0], art.edit[0]) and torch.equal(loaded.edit[1], art.edit[1])
    assert loaded.to_bytes() == data
    assert loaded.trainable_parameters == 48 + 2 * 6 * 384
    assert len(data) < 24 * 1024


def test_schema_2_artifacts_load_as_before_without_an_edit() -> None:
    art = _artifact()
    tensors = {"coefficients": art.coefficients, "head.weight": art.head_weight, "head.bias": art.head_bias}
    loaded = read_artifact(_signed(tensors, schema="2"), EDIT_SPEC)
    assert loaded.schema_version == 2 and loaded.edit is None and loaded.trainable_parameters == 48
    assert torch.equal(loaded.coefficients, art.coefficients)
    assert torch.equal(loaded.head_weight, art.head_weight)


def _edit_tensors(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    art = _edited()
    assert art.edit is not None
    tensors = _tensors() | {"ffn.scale": art.edit[0], "ffn.shift": art.edit[1]}
    for key, value in changes.items():
        name = key.replace("_", ".", 1)
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    return tensors


def _huge_scale() -> dict[str, torch.Tensor]:
    scale = torch.ones(6, 384)
    scale[2, 7] = 5e3
    return _edit_tensors(ffn_scale=scale)


def _nan_shift() -> dict[str, torch.Tensor]:
    shift = torch.zeros(6, 384)
    shift[0, 0] = float("nan")
    return _edit_tensors(ffn_shift=shift)


def _pooled(query: torch.Tensor) -> dict[str, torch.Tensor]:
    return _tensors() | {"pool.query": query}


EDIT_CASES = [
    ("a query in schema 2", lambda: _signed(_pooled(torch.zeros(384)), "2"), SPEC, ArtifactKeyError),
    ("a query of the wrong size", lambda: _signed(_pooled(torch.zeros(383))), SPEC, ArtifactShapeError),
    ("a 2-D query", lambda: _signed(_pooled(torch.zeros(1, 384))), SPEC, ArtifactShapeError),
    ("a huge query", lambda: _signed(_pooled(torch.full((384,), 2e3))), SPEC, ArtifactValueError),
    (
        "an edit in a schema 2 artifact",
        lambda: _signed(_edit_tensors(), schema="2"),
        EDIT_SPEC,
        ArtifactKeyError,
    ),
    ("scale without shift", lambda: _signed(_edit_tensors(ffn_shift=None)), EDIT_SPEC, ArtifactKeyError),
    (
        "edit of the wrong width",
        lambda: _signed(_edit_tensors(ffn_scale=torch.ones(6, 128), ffn_shift=torch.zeros(6, 128))),
        EDIT_SPEC,
        ArtifactShapeError,
    ),
    (
        "scale and shift of different shapes",
        lambda: _signed(_edit_tensors(ffn_shift=torch.zeros(5, 384))),
        EDIT_SPEC,
        ArtifactShapeError,
    ),
    ("a bank without an FFN kind", lambda: _signed(_edit_tensors()), SPEC, ArtifactShapeError),
    ("a huge scale", lambda: _signed(_huge_scale()), EDIT_SPEC, ArtifactValueError),
    ("a NaN shift", lambda: _signed(_nan_shift()), EDIT_SPEC, ArtifactNonFinite),
]


@pytest.mark.parametrize(("case", "make", "spec", "error"), EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_bad_ffn_edits_raise_their_typed_error(  # type: ignore[no-untyped-def]
    case: str, make, spec: ArtifactSpec, error: type[ArtifactError]
) -> None:
    with pytest.raises(error) as info:
        read_artifact(make(), spec)
    assert type(info.value) is error


def test_scale_and_shift_come_together() -> None:
    art = _artifact()
    with pytest.raises(ValueError, match="together"):
        TaskArtifact(art.coefficients, art.head_weight, art.head_bias, LABELS, FP, ffn_scale=torch.ones(6, 8))


def test_a_pooling_query_round_trips_beside_an_edit() -> None:
    query = torch.randn(384, generator=torch.Generator().manual_seed(3))
    art = replace(_edited(), pool_query=query)
    loaded = read_artifact(art.to_bytes(), EDIT_SPEC)
    assert loaded.pool_query is not None and torch.equal(loaded.pool_query, query)
    assert loaded.edit is not None and loaded.trainable_parameters == 48 + 2 * 6 * 384 + 384
    assert read_artifact(_signed(_pooled(query)), SPEC).edit is None
