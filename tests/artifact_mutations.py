"""Hypothesis strategies for corrupt task artifacts, each starting from a valid artifact's bytes.

A sample changes one to three layers: the tensors (shapes, dtypes, NaN/Inf, missing or extra keys), the
metadata (fingerprint, labels, training summary, schema version), the safetensors header (offsets, sizes,
dtypes, non-objects) and the raw bytes (bit flips, truncation, header length field, garbage, oversize).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import note
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from recast_core.artifact import CHECKSUM_KEY, KEYS, TaskArtifact

MAX_UPLOAD = 64 << 10  # bytes: the "oversize" change goes past it
NUMPY_DTYPES = (np.float16, np.float64, np.int64, np.int32, np.int8, np.uint8, np.bool_)


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
    "schema_version": st.sampled_from(["0", "4", "1.0", " 1", "", "01", "1\n"]) | plain_text,
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
    kind = draw(st.sampled_from(["shape", "shape", "dtype", "non_finite", "huge", "drop", "add"]))
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
    elif kind == "huge" and tensors[key].dtype == np.float32 and tensors[key].size:
        flat = tensors[key].reshape(-1).copy()  # finite, but too large to serve (logits would overflow)
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([1e20, -3e38, 2e3, 1e12]))
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
    if "tensor" in layers and CHECKSUM_KEY in base.metadata and draw(st.integers(0, 7)) > 0:
        # mostly a consistent checksum, so that the checks behind it are reached; sometimes a stale one
        (length,) = struct.unpack("<Q", data[:8])
        base.metadata[CHECKSUM_KEY] = hashlib.sha256(data[8 + length :]).hexdigest()
        data = st_save(base.tensors, metadata=base.metadata)
    if "header" in layers:
        data = draw(header_change(data, sample))
    if "bytes" in layers:
        data = draw(byte_change(data, sample))
    sample.data = data
    note(f"{sample.steps} ({len(data)} bytes)")
    return sample
