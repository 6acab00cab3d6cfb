"""Task artifacts: a few KB of safetensors holding one task's coefficients and classifier head.

Tensors: `coefficients` (M, n) float32 (the K sets collapsed), `head.weight` (C, H), `head.bias` (C,);
from schema 3 on, optionally `ffn.scale` and `ffn.shift` (L, H') together: a per-channel scale and shift of
every layer's FFN output (representation editing), for banks that have an FFN output kind, and
optionally `pool.query` (H,): the task's attention-pooling query (recast_core/pooling.py).
Metadata (all strings): `schema_version`, `bank_fingerprint`, `labels` (JSON list of C strings),
`created` (ISO 8601 UTC), `training` (JSON object), `tensor_sha256` (hex sha256 of the tensor data, the
bytes after the header; schema 2 on; schema 1 artifacts, written before it existed, still load, and so
do schema 2 artifacts, written before the FFN edit existed).

Loading parses the header itself before any tensor is materialised, so truncated files, huge headers
and bad offsets fail fast with a typed error. Metadata JSON is parsed with bounded numbers (no integer of
more than MAX_NUMBER_DIGITS digits, no NaN or Infinity). Values are bounded so that no logit can overflow:
|coefficient| <= MAX_ABS_COEFFICIENT, |FFN scale, shift and query| <= MAX_ABS_EDIT, and with the backbone's
embedding bound E (|embedding_j| <= E),
E * sum_j |head.weight[c, j]| + |head.bias[c]| <= MAX_LOGIT for every class c.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load

from recast_core.errors import (
    ArtifactChecksumMismatch,
    ArtifactCorrupt,
    ArtifactDtypeError,
    ArtifactKeyError,
    ArtifactMetadataError,
    ArtifactNonFinite,
    ArtifactShapeError,
    ArtifactTooLarge,
    ArtifactValueError,
    FingerprintMismatch,
    LabelCountMismatch,
)
from recast_core.files import write_atomic

SCHEMA_VERSION = 3
READABLE_SCHEMAS = ("1", "2", "3")  # 1: before tensor_sha256; 2: before the optional FFN edit
KEYS = ("coefficients", "head.bias", "head.weight")
EDIT_KEYS = ("ffn.scale", "ffn.shift")  # optional, together, from schema 3 on
POOL_KEY = "pool.query"  # optional, from schema 3 on
FIRST_EDIT_SCHEMA = 3
METADATA_KEYS = ("bank_fingerprint", "created", "labels", "schema_version", "training")
CHECKSUM_KEY = "tensor_sha256"
MAX_CREATED_CHARS = 64
MAX_NUMBER_DIGITS = 64  # digits of a number in the metadata JSON (Python refuses ints over 4,300)
MAX_ABS_COEFFICIENT = 1e3  # trained coefficients are O(1): this keeps every activation finite in fp32/bf16
MAX_ABS_EDIT = 1e3  # FFN scales are O(1), shifts O(0.1), query components O(1): the same headroom
MAX_LOGIT = 1e30  # far below float32's 3.4e38: logits stay finite however the head is computed
MAX_ABS_HEAD_VALUE = 1e12  # without a known embedding bound, head values are bounded one by one
_HEX64 = re.compile(r"[0-9a-f]{64}")
DEFAULT_MAX_BYTES = 1 << 20
MAX_HEADER_BYTES = 64 << 10
MAX_LABELS = 4096
MAX_LABEL_CHARS = 256
MAX_TRAINING_DEPTH = 32  # nesting of the training summary (what the server's JSON answers can render)
_DTYPE_SIZES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class ArtifactSpec:
    """What a bank expects of a task artifact."""

    bank_fingerprint: str
    num_slots: int
    num_templates: int
    hidden_size: int
    max_bytes: int = DEFAULT_MAX_BYTES
    #: |embedding_j| <= embedding_bound for every embedding the backbone can produce (None: unknown)
    embedding_bound: float | None = None
    #: (L, H') of the FFN edit the bank's encoder can apply; None: artifacts with an edit are refused
    edit_shape: tuple[int, int] | None = None


@dataclass(frozen=True, eq=False)
class TaskArtifact:
    coefficients: torch.Tensor  # (M, n)
    head_weight: torch.Tensor  # (C, H)
    head_bias: torch.Tensor  # (C,)
    labels: tuple[str, ...]
    bank_fingerprint: str
    training: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION
    ffn_scale: torch.Tensor | None = None  # (L, H'): every layer's FFN output, per channel (with ffn_shift)
    ffn_shift: torch.Tensor | None = None  # (L, H')
    pool_query: torch.Tensor | None = None  # (H,): attention pooling; None: the mean pool

    def __post_init__(self) -> None:
        if (self.ffn_scale is None) != (self.ffn_shift is None):
            raise ValueError("ffn_scale and ffn_shift come together")
        if (
            self.ffn_scale is not None
            and self.ffn_shift is not None
            and (self.ffn_scale.ndim != 2 or self.ffn_scale.shape != self.ffn_shift.shape)
        ):
            raise ValueError(
                f"ffn_scale and ffn_shift must be the same (L, H') shape, got "
                f"{tuple(self.ffn_scale.shape)} and {tuple(self.ffn_shift.shape)}"
            )

    @property
    def edit(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, shift) of the FFN outputs, or None for a task that only has coefficients."""
        if self.ffn_scale is None or self.ffn_shift is None:
            return None
        return self.ffn_scale, self.ffn_shift

    @property
    def edit_parameters(self) -> int:
        return 0 if self.edit is None else 2 * int(self.edit[0].numel())

    @property
    def pool_parameters(self) -> int:
        return 0 if self.pool_query is None else int(self.pool_query.numel())

    @property
    def extra_parameters(self) -> int:
        """Beyond the coefficients and the head: the FFN edit's and the pooling query's."""
        return self.edit_parameters + self.pool_parameters

    @property
    def trainable_parameters(self) -> int:
        """The per-task numbers besides the head: coefficients and, when present, the FFN edit and the
        pooling query."""
        return int(self.coefficients.numel()) + self.extra_parameters

    @property
    def head_parameters(self) -> int:
        return int(self.head_weight.numel() + self.head_bias.numel())

    def to_bytes(self) -> bytes:
        tensors = {
            "coefficients": self.coefficients.detach().to(torch.float32).contiguous(),
            "head.weight": self.head_weight.detach().to(torch.float32).contiguous(),
            "head.bias": self.head_bias.detach().to(torch.float32).contiguous(),
        }
        if self.edit is not None:
            for key, value in zip(EDIT_KEYS, self.edit, strict=True):
                tensors[key] = value.detach().to(torch.float32).contiguous()
        if self.pool_query is not None:
            tensors[POOL_KEY] = self.pool_query.detach().to(torch.float32).contiguous()
        metadata = {
            "schema_version": str(SCHEMA_VERSION),
            "bank_fingerprint": self.bank_fingerprint,
            "labels": json.dumps(list(self.labels)),
            "created": self.created,
            "training": json.dumps(self.training, sort_keys=True),
        }
        return serialize(tensors, metadata, checksum=True)

    def save(self, path: Path) -> int:
        """Write atomically (temp file in the same directory, fsync, rename); returns the byte count."""
        data = self.to_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        return len(data)


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, checksum: bool = False) -> bytes:
    """Byte-deterministic safetensors: sorted keys, data laid out in key order, header padded to 8 bytes.

    checksum: record the sha256 of the tensor data in the metadata (`tensor_sha256`)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks: list[bytes] = []
    offset = 0
    for key in sorted(tensors):
        if tensors[key].dtype != torch.float32:
            raise ValueError(f"{key}: only float32 tensors are written, got {tensors[key].dtype}")
        data = tensors[key].detach().to("cpu").contiguous().numpy().tobytes()
        header[key] = {
            "dtype": "F32",
            "shape": list(tensors[key].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    if checksum:
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        header["__metadata__"] = dict(sorted((metadata | {CHECKSUM_KEY: digest.hexdigest()}).items()))
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)


def read_artifact(source: Path | bytes, spec: ArtifactSpec | None = None) -> TaskArtifact:
    """Parse and validate an artifact from a path or bytes.

    With `spec`, the artifact must also fit that bank (fingerprint, coefficient shape, hidden size). Each
    failure raises its own ArtifactError subclass naming what was expected and what was found.
    """
    max_bytes = spec.max_bytes if spec is not None else DEFAULT_MAX_BYTES
    data = _read_bounded(source, max_bytes)
    header = _parse_header(data)
    metadata = header.pop("__metadata__", None)
    _verify_checksum(data, metadata)
    keys = sorted(header)
    labels, fingerprint, training, created, version = _parse_metadata(metadata)
    edited = any(key in header for key in EDIT_KEYS)
    optional = version >= FIRST_EDIT_SCHEMA
    pooled = POOL_KEY in header and optional
    expected = sorted(KEYS + (EDIT_KEYS if edited and optional else ()) + ((POOL_KEY,) if pooled else ()))
    if keys != expected:
        missing = sorted(set(expected) - set(keys))
        extra = sorted(set(keys) - set(expected))
        raise ArtifactKeyError(
            f"tensor keys differ (missing {missing}, unexpected {extra})", expected=expected, found=keys
        )
    for key in expected:
        if header[key].get("dtype") != "F32":
            raise ArtifactDtypeError(
                f"tensor {key!r} has the wrong dtype", expected="F32", found=header[key].get("dtype")
            )
    shapes = {key: tuple(header[key]["shape"]) for key in expected}
    if edited:
        _check_edit_shapes(shapes["ffn.scale"], shapes["ffn.shift"], spec)
    num_labels = len(labels)
    coeff_shape = shapes["coefficients"]
    if len(coeff_shape) != 2:
        raise ArtifactShapeError(
            "coefficients must be 2-D (slots, templates)", expected="(M, n)", found=coeff_shape
        )
    if len(shapes["head.weight"]) != 2:
        raise ArtifactShapeError("head.weight must be 2-D", expected="(C, H)", found=shapes["head.weight"])
    if shapes["head.weight"][0] != num_labels or shapes["head.bias"] != (num_labels,):
        raise LabelCountMismatch(
            f"the head has a different number of classes than the {num_labels} labels",
            expected=f"head.weight ({num_labels}, H) and head.bias ({num_labels},)",
            found=f"head.weight {shapes['head.weight']}, head.bias {shapes['head.bias']}",
        )
    if spec is not None:
        if fingerprint != spec.bank_fingerprint:
            raise FingerprintMismatch(
                "the artifact was trained on another template bank",
                expected=spec.bank_fingerprint,
                found=fingerprint,
            )
        if coeff_shape != (spec.num_slots, spec.num_templates):
            raise ArtifactShapeError(
                "coefficients do not fit the bank",
                expected=(spec.num_slots, spec.num_templates),
                found=coeff_shape,
            )
        if shapes["head.weight"][1] != spec.hidden_size:
            raise ArtifactShapeError(
                "head.weight does not fit the backbone's hidden size",
                expected=(num_labels, spec.hidden_size),
                found=shapes["head.weight"],
            )
    if POOL_KEY in shapes:
        hidden = shapes["head.weight"][1]  # == spec.hidden_size, checked above
        if shapes[POOL_KEY] != (hidden,):
            raise ArtifactShapeError(
                "pool.query must be one vector of the backbone's hidden size",
                expected=(hidden,),
                found=shapes[POOL_KEY],
            )
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error type for any inconsistency
        raise ArtifactCorrupt(f"tensor data is unreadable: {exc}") from exc
    if not _all_finite(tensors):  # the common case in one pass; otherwise name the tensor and the count
        for key in expected:
            if not bool(torch.isfinite(tensors[key]).all()):
                bad = int((~torch.isfinite(tensors[key])).sum())
                raise ArtifactNonFinite(
                    f"tensor {key!r} holds {bad} NaN/Inf values", expected="all finite", found=bad
                )
    _check_values(tensors, spec.embedding_bound if spec is not None else None)
    return _artifact(tensors, labels, fingerprint, training, created, version)


def _check_edit_shapes(scale: tuple[int, ...], shift: tuple[int, ...], spec: ArtifactSpec | None) -> None:
    if len(scale) != 2 or scale != shift:
        raise ArtifactShapeError(
            "ffn.scale and ffn.shift must be 2-D and of one shape",
            expected="(L, H') twice",
            found=[scale, shift],
        )
    if spec is not None and scale != spec.edit_shape:
        raise ArtifactShapeError(
            "the FFN edit does not fit the bank"
            if spec.edit_shape is not None
            else "the bank has no FFN output kind for ffn.scale and ffn.shift to edit",
            expected=spec.edit_shape,
            found=scale,
        )


def _all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(np.isfinite(value.numpy()).all()) for value in tensors.values())


def _check_values(tensors: dict[str, torch.Tensor], embedding_bound: float | None) -> None:
    """Finite values small enough that no activation or logit can overflow (ArtifactValueError)."""
    coefficients = tensors["coefficients"].numpy()
    if coefficients.size and (largest := float(np.abs(coefficients).max())) > MAX_ABS_COEFFICIENT:
        raise ArtifactValueError(
            "a coefficient is too large to serve",
            expected=f"|coefficient| <= {MAX_ABS_COEFFICIENT:g}",
            found=f"{largest:.3g}",
        )
    for key in (*EDIT_KEYS, POOL_KEY):
        values = tensors.get(key)
        if values is not None and values.numel() and (largest := float(values.abs().max())) > MAX_ABS_EDIT:
            raise ArtifactValueError(
                f"a value of {key} is too large to serve",
                expected=f"|{key}| <= {MAX_ABS_EDIT:g}",
                found=f"{largest:.3g}",
            )
    weight = np.abs(tensors["head.weight"].numpy().astype(np.float64))
    bias = np.abs(tensors["head.bias"].numpy().astype(np.float64))
    if embedding_bound is None:
        largest = max(float(weight.max(initial=0.0)), float(bias.max(initial=0.0)))
        if largest > MAX_ABS_HEAD_VALUE:
            raise ArtifactValueError(
                "a head value is too large to serve",
                expected=f"|value| <= {MAX_ABS_HEAD_VALUE:g}",
                found=f"{largest:.3g}",
            )
        return
    logits = embedding_bound * weight.sum(axis=1) + bias  # (C,): the largest |logit| of each class
    if logits.size and (worst := float(logits.max())) > MAX_LOGIT:
        raise ArtifactValueError(
            f"the head can produce logits of up to {worst:.3g} (class {int(logits.argmax())})",
            expected=f"|logit| <= {MAX_LOGIT:g}",
            found=f"{worst:.3g}",
        )


def _verify_checksum(data: bytes, metadata: object) -> None:
    """The tensor data hashes to the metadata's `tensor_sha256` (when the metadata has one)."""
    if not isinstance(metadata, dict) or CHECKSUM_KEY not in metadata:
        return  # schema 1 (no checksum), or no metadata at all: _parse_metadata names the problem
    recorded = metadata[CHECKSUM_KEY]
    if not isinstance(recorded, str) or not _HEX64.fullmatch(recorded):
        raise ArtifactMetadataError(
            f"metadata {CHECKSUM_KEY!r} must be a sha256 hex digest", expected="64 hex digits", found=recorded
        )
    (header_len,) = struct.unpack("<Q", data[:8])
    actual = hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()
    if actual != recorded:
        raise ArtifactChecksumMismatch(
            "the tensor data does not match its recorded sha256 (corrupted?)", expected=recorded, found=actual
        )


def _artifact(
    tensors: dict[str, torch.Tensor],
    labels: tuple[str, ...],
    fingerprint: str,
    training: dict[str, Any],
    created: str,
    version: int,
) -> TaskArtifact:
    return TaskArtifact(
        coefficients=tensors["coefficients"],
        head_weight=tensors["head.weight"],
        head_bias=tensors["head.bias"],
        labels=labels,
        bank_fingerprint=fingerprint,
        training=training,
        created=created,
        schema_version=version,
        ffn_scale=tensors.get("ffn.scale"),
        ffn_shift=tensors.get("ffn.shift"),
        pool_query=tensors.get(POOL_KEY),
    )


def _read_bounded(source: Path | bytes, max_bytes: int) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        try:
            size = source.stat().st_size
        except OSError as exc:
            raise ArtifactCorrupt(f"cannot read {source}: {exc.strerror}") from exc
        if size > max_bytes:
            raise ArtifactTooLarge(
                "the artifact exceeds the size cap", expected=f"<= {max_bytes} bytes", found=size
            )
        data = source.read_bytes()
    if len(data) > max_bytes:
        raise ArtifactTooLarge(
            "the artifact exceeds the size cap", expected=f"<= {max_bytes} bytes", found=len(data)
        )
    return data


def _parse_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ArtifactCorrupt("too short for a safetensors header", expected=">= 8 bytes", found=len(data))
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise ArtifactCorrupt("header too large", expected=f"<= {MAX_HEADER_BYTES} bytes", found=header_len)
    if 8 + header_len > len(data):
        raise ArtifactCorrupt(
            "truncated header", expected=f"{8 + header_len} bytes at least", found=len(data)
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # Recursion: nested too deep
        raise ArtifactCorrupt(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ArtifactCorrupt("header is not a JSON object", expected="object", found=type(header).__name__)
    body = len(data) - 8 - header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ArtifactCorrupt(f"tensor entry {key!r} is malformed")
        shape, offsets, dtype = info["shape"], info["data_offsets"], info["dtype"]
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise ArtifactCorrupt(f"tensor entry {key!r} has a malformed dtype, shape or offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= body:
            raise ArtifactCorrupt(
                f"tensor {key!r} lies outside the data (truncated file?)",
                expected=f"offsets within {body} bytes",
                found=offsets,
            )
        size = _DTYPE_SIZES.get(dtype)
        if size is not None and end - begin != math.prod(shape) * size:
            raise ArtifactCorrupt(
                f"tensor {key!r} byte length does not match its shape",
                expected=math.prod(shape) * size,
                found=end - begin,
            )
    return header


def _parse_metadata(metadata: object) -> tuple[tuple[str, ...], str, dict[str, Any], str, int]:
    if not isinstance(metadata, dict):
        raise ArtifactMetadataError("metadata is missing", expected=list(METADATA_KEYS), found=None)
    missing = sorted(set(METADATA_KEYS) - set(metadata))
    if missing:
        raise ArtifactMetadataError(
            f"metadata keys missing: {missing}", expected=list(METADATA_KEYS), found=sorted(metadata)
        )
    for key in sorted(metadata):
        if not isinstance(metadata[key], str):
            raise ArtifactMetadataError(
                f"metadata {key!r} must be a string", expected="string", found=type(metadata[key]).__name__
            )
    version = metadata["schema_version"]
    if version not in READABLE_SCHEMAS:
        raise ArtifactMetadataError(
            "metadata 'schema_version' is not supported",
            expected=" or ".join(READABLE_SCHEMAS),
            found=version,
        )
    if version != "1" and CHECKSUM_KEY not in metadata:
        raise ArtifactMetadataError(
            f"metadata {CHECKSUM_KEY!r} is missing (required from schema 2 on)", expected="64 hex digits"
        )
    labels = _metadata_json(metadata, "labels")
    training = _metadata_json(metadata, "training")
    if not isinstance(labels, list) or not all(
        isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in labels
    ):
        raise ArtifactMetadataError(
            "metadata 'labels' must be a JSON list of non-empty strings",
            expected="list[str]",
            found=type(labels).__name__,
        )
    if not 2 <= len(labels) <= MAX_LABELS or len(set(labels)) != len(labels):
        raise ArtifactMetadataError(
            "metadata 'labels' must be 2 to 4096 distinct strings",
            expected="2..4096 distinct",
            found=len(labels),
        )
    if not isinstance(training, dict):
        raise ArtifactMetadataError(
            "metadata 'training' must be a JSON object", expected="object", found=type(training).__name__
        )
    if (depth := _nesting(training)) > MAX_TRAINING_DEPTH:
        raise ArtifactMetadataError(
            "metadata 'training' is nested too deeply",
            expected=f"<= {MAX_TRAINING_DEPTH} levels",
            found=depth,
        )
    fingerprint = metadata["bank_fingerprint"]
    if not _HEX64.fullmatch(fingerprint):
        raise ArtifactMetadataError(
            "metadata 'bank_fingerprint' must be a sha256 hex digest",
            expected="64 hex digits",
            found=fingerprint[:80],
        )
    created = metadata["created"]
    if len(created) > MAX_CREATED_CHARS or not _is_timestamp(created):
        raise ArtifactMetadataError(
            "metadata 'created' must be an ISO 8601 timestamp",
            expected=f"e.g. 2026-01-31T12:00:00+00:00, at most {MAX_CREATED_CHARS} characters",
            found=f"{len(created)} characters" if len(created) > MAX_CREATED_CHARS else repr(created),
        )
    try:  # all of it is served back as JSON: no string may hold a lone surrogate (JSON's \ud800 escapes)
        json.dumps([labels, training], ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError) as exc:
        raise ArtifactMetadataError(
            f"metadata 'labels' or 'training' is not valid Unicode text: {exc}"
        ) from exc
    return tuple(labels), fingerprint, training, created, int(version)


def _metadata_json(metadata: dict[str, str], key: str) -> Any:
    """The metadata field `key` parsed as JSON with bounded numbers; ArtifactMetadataError names the field."""
    try:
        return json.loads(
            metadata[key], parse_int=_bounded_int, parse_float=_bounded_float, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; Recursion: too deep
        raise ArtifactMetadataError(f"metadata {key!r} is not valid JSON: {exc}") from None


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(text)} digits (at most {MAX_NUMBER_DIGITS})")
    return int(text)


def _bounded_float(text: str) -> float:
    if len(text) > MAX_NUMBER_DIGITS:
        raise ValueError(f"a number of {len(text)} characters (at most {MAX_NUMBER_DIGITS})")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} does not fit a double")
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not a JSON number")


def _is_timestamp(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _nesting(value: object) -> int:
    """How deeply lists and objects nest in a parsed JSON value (walked without recursion)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        node, depth = pending.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in children)
    return deepest
