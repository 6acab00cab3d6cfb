"""Device and dtype settings: validated words, resolved to what this machine can serve, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from kernels import cpu_features
from recast_core.device import DeviceError, resolve_device, resolve_dtype
from server.serving.predictor import MIN_GROUP, length_groups
from server.settings import Settings


def test_settings_refuse_unknown_devices_and_dtypes() -> None:
    with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N"):
        Settings(device="tpu")
    with pytest.raises(ValidationError, match="dtype must be one of"):
        Settings(dtype="float64")
    assert Settings(device=" CUDA:1 ", dtype="BFloat16").device == "cuda:1"


def test_auto_resolves_to_what_the_machine_has(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = torch.device("cpu")
    native = torch.bfloat16 if cpu_features.bf16_native() else torch.float32
    assert resolve_dtype("auto", cpu) is native
    for flags, want in (("fpu avx2 fma avx512f", torch.float32), ("avx2 avx512_bf16", torch.bfloat16)):
        monkeypatch.setattr(cpu_features, "flags_line", lambda flags=flags: flags)
        assert resolve_dtype("auto", cpu) is want, flags
        assert resolve_dtype("auto", cpu, kernel_path="reference") is torch.float32
    monkeypatch.setattr(cpu_features, "flags_line", lambda: "avx2 amx_tile amx_bf16")
    assert resolve_dtype("auto", cpu) is torch.bfloat16
    assert resolve_dtype("float32", cpu) is torch.float32
    with caplog.at_level("WARNING", logger="recast_core.device"):
        assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
        assert not caplog.records  # native bf16: served without a word
        monkeypatch.setattr(cpu_features, "flags_line", lambda: "fpu avx2 fma avx512f")
        assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16  # as asked, but said
        assert [r.message for r in caplog.records] == [
            "dtype bfloat16 on a CPU without AVX512-BF16 or AMX: emulated, several times slower than "
            "float32 here (RECAST_DTYPE=auto picks float32 on this CPU)"
        ]
    with pytest.raises(DeviceError, match="float16 on the CPU"):
        resolve_dtype("float16", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_start_up_error(tmp_path: object) -> None:
    with pytest.raises(DeviceError, match="device cuda: CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="device cuda:1: CUDA is not available"):
        resolve_device("cuda:1")
    done = subprocess.run(
        [sys.executable, "-m", "recast_cli.main", "serve", "--device", "cuda", "--store", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "device cuda: CUDA is not available" in lines[0], done.stderr


def test_length_groups_cut_where_padding_is_saved() -> None:
    short, long = [8] * 20, [64] * 20
    groups = length_groups(short + long)
    assert [sorted(g) for g in groups] == [list(range(20)), list(range(20, 40))]
    assert length_groups([10, 11, 12] * 10) == [sorted(range(30), key=lambda i: [10, 11, 12][i % 3])]
    few = length_groups([4] * (MIN_GROUP - 1) + [64] * 30)  # too few short texts for a group of their own
    assert len(few) == 1
    assert sorted(i for g in length_groups(list(range(1, 100))) for i in g) == list(range(99))


def test_heads_are_kept_in_the_serving_dtype_on_the_serving_device() -> None:
    from server.tasks.heads import Head, HeadCache

    cache = HeadCache(1 << 20, device="cpu", dtype=torch.bfloat16)
    cache.put("digest", Head(torch.randn(3, 8), torch.randn(3), (torch.ones(2, 8), torch.zeros(2, 8))))
    head = cache.get("digest")
    assert head is not None and head.edit is not None
    parts = (head.weight, head.bias, *head.edit)
    assert all(t.dtype is torch.bfloat16 and t.device.type == "cpu" for t in parts)
    assert cache.nbytes == (3 * 8 + 3 + 2 * 2 * 8) * 2


def test_a_bfloat16_predictor_on_the_cpu_agrees_with_float32(backbone: object, default_bank: object) -> None:
    from server_harness import task_artifact

    from kernels import Kernels
    from server.serving.predictor import Predictor, TaskRequest
    from server.stores.base import StoredTask
    from server.tasks.heads import Head
    from server.tasks.registry import TaskEntry

    artifact = task_artifact(default_bank, 3, labels=("a", "b", "c"))  # type: ignore[arg-type]
    entry = TaskEntry.of(StoredTask("t", 1, artifact.to_bytes(), "now"), artifact, "t")
    texts = ["Who wrote Hamlet?", "free entry in a weekly prize draw", "see you at five"]
    probs = {}
    for dtype in (torch.float32, torch.bfloat16):
        predictor = Predictor(backbone, default_bank, Kernels("cpu"), max_length=32, dtype=dtype)  # type: ignore[arg-type]
        head = Head.of(artifact).to(torch.device("cpu"), dtype)
        probs[dtype] = predictor.probabilities([TaskRequest(entry, head, texts)])[0]
    assert torch.equal(probs[torch.float32].argmax(1), probs[torch.bfloat16].argmax(1))
    assert float((probs[torch.float32] - probs[torch.bfloat16]).abs().max()) < 0.05
