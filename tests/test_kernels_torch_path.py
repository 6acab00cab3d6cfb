"""The CPU serving path (compiled fused kernel, per-task fallback, weight cache) and the dispatcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kernels import (
    ComposedWeightCache,
    KernelPath,
    Kernels,
    KernelUnavailable,
    cpu_features,
    reference,
    segments_of,
    select_path,
)
from kernels.packed_templates import STACKED, Layout, PackedTemplateCache, pack, pack_blocks
from kernels.segments import Segments
from kernels.torch_path import TorchPath
from kernels.variant_choice import UnknownVariant, VariantChooser, forced_variant, kind_of

ROOT = Path(__file__).resolve().parent.parent

SHAPES = [(384, 384), (1152, 384), (1536, 384), (384, 1536), (37, 50)]


def _problem(
    out: int, in_features: int, rows: int, num_slots: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, in_features, generator=gen),
        torch.randint(0, num_slots, (rows,), generator=gen),
        torch.randn(2, out, in_features, generator=gen) / in_features**0.5,
        torch.randn(num_slots, 2, generator=gen),
        torch.randn(out, generator=gen),
    )


FLOAT32_VARIANTS = ["brgemm", "microkernel", "sgemm", "template_space", "composed"]


@pytest.fixture(scope="module", params=FLOAT32_VARIANTS)
def fused(request: pytest.FixtureRequest) -> TorchPath:
    """The CPU path with one variant forced (every one of them is tested on every x86-64 machine)."""
    variant = request.param
    path = TorchPath(ComposedWeightCache(1 << 24), use_microkernel=variant != "sgemm", variant=variant)
    assert path.extension is not None, "the compiled CPU kernel must build on the test machine"
    if variant == "microkernel":
        assert path.microkernel, "x86-64 test machines have AVX2/FMA: the micro-kernel must be compiled in"
    assert variant in path.variants(torch.float32), f"{variant} must run for float32 on x86-64"
    return path


def _ran(path: TorchPath, variant: str) -> None:
    """Every kind of call `path` served with several slots ran `variant`."""
    assert path.choices() and set(path.choices().values()) == {variant}, path.choices()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("layout", ["random", "sorted", "one_task", "all_different"])
def test_compiled_kernel_matches_reference(fused: TorchPath, shape: tuple[int, int], layout: str) -> None:
    x, slot, templates, coeffs, bias = _problem(*shape, rows=300, num_slots=7)
    if layout == "sorted":
        slot = torch.sort(slot).values
    elif layout == "one_task":
        slot = torch.full_like(slot, 4)
    elif layout == "all_different":
        x, slot = x[:7], torch.tensor([3, 0, 6, 1, 5, 2, 4])
    want = reference.segmented_template_linear(x, slot, templates, coeffs, bias)
    got = fused.linear(x, segments_of(slot), templates, coeffs, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    no_bias = fused.linear(x, segments_of(slot), templates, coeffs, None)
    torch.testing.assert_close(no_bias, want - bias, rtol=1e-5, atol=1e-4)
    if layout != "one_task":
        _ran(fused, fused.chooser.forced or "")


BFLOAT16_VARIANTS = ["brgemm", "template_space", "composed"]


@pytest.mark.parametrize("variant", BFLOAT16_VARIANTS)
@pytest.mark.parametrize(
    "shape", [(384, 384), (1152, 384), (384, 1536), (37, 50)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_bfloat16_variants_match_the_reference(variant: str, shape: tuple[int, int]) -> None:
    """bfloat16 storage, float32 accumulation: within bf16 rounding of the float32 contract."""
    path = TorchPath(ComposedWeightCache(1 << 24), variant=variant)
    if variant not in path.variants(torch.bfloat16):
        assert variant == "brgemm" and not cpu_features.bf16_native(), "BRGEMM bf16 runs where bf16 is native"
        pytest.skip("no native bfloat16 on this CPU: BRGEMM refuses it (covered by the template-space path)")
    x, slot, templates, coeffs, bias = _problem(*shape, rows=300, num_slots=7)
    x, templates, bias = x.bfloat16(), templates.bfloat16(), bias.bfloat16()
    want = reference.segmented_template_linear(x.float(), slot, templates.float(), coeffs, bias.float())
    got = path.linear(x, segments_of(slot), templates, coeffs, bias)
    assert got.dtype == torch.bfloat16
    error = (got.float() - want).norm() / want.norm()
    assert error < 1e-2, f"relative error {error:.2e}"
    _ran(path, variant)


def test_the_chooser_measures_every_variant_and_keeps_the_fastest() -> None:
    path = TorchPath(ComposedWeightCache(1 << 24))
    x, slot, templates, coeffs, bias = _problem(384, 384, rows=256, num_slots=8)
    want = reference.segmented_template_linear(x, slot, templates, coeffs, bias)
    torch.testing.assert_close(path.linear(x, segments_of(slot), templates, coeffs, bias), want)
    ((kind, timings),) = path.chooser.timings().items()
    assert set(timings) == set(path.variants(torch.float32)) and all(t > 0 for t in timings.values())
    assert path.choices() == {kind: min(timings, key=lambda name: timings[name])}
    again = path.linear(x, segments_of(slot), templates, coeffs, bias)  # same kind: no new measurement
    torch.testing.assert_close(again, want)
    assert len(path.chooser.timings()) == 1


def test_variant_choice_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def candidate(name: str, seconds: float) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            calls.append(name)
            time.sleep(seconds)
            return torch.tensor([len(name)])

        return run

    kind = kind_of(torch.zeros(100, 8), torch.zeros(2, 4, 8), runs=10)
    assert (kind.rows_log2, kind.run_log2) == (6, 3)
    chooser = VariantChooser(trials=2)
    slow_fast = {"slow": candidate("slow", 0.02), "fast": candidate("fast", 0.0)}
    chooser.run(kind, slow_fast)
    assert sorted(calls) == ["fast", "fast", "slow", "slow"] and chooser.choices() == {str(kind): "fast"}
    calls.clear()
    assert chooser.run(kind, slow_fast).item() == 4 and calls == ["fast"]
    forced = VariantChooser(forced="slow")
    forced.run(kind, slow_fast)
    assert forced.choices() == {str(kind): "slow"} and forced.timings() == {}
    monkeypatch.setenv("RECAST_CPU_VARIANT", "fastest")
    with pytest.raises(UnknownVariant, match="not one of brgemm, microkernel"):
        forced_variant()
    with pytest.raises(KernelUnavailable, match="RECAST_CPU_VARIANT='fastest'"):
        Kernels("cpu", path="torch")
    monkeypatch.setenv("RECAST_CPU_VARIANT", " BRGEMM ")
    assert forced_variant() == "brgemm"


LOWER_ISA_SCRIPT = """
import json, torch
from kernels import cpu_ext, reference, segments_of
from kernels.torch_path import TorchPath
gen = torch.Generator().manual_seed(1)
x, slot = torch.randn(200, 384, generator=gen), torch.randint(0, 9, (200,), generator=gen)
templates, coeffs = torch.randn(2, 1152, 384, generator=gen) / 20, torch.randn(9, 2, generator=gen)
want = reference.segmented_template_linear(x, slot, templates, coeffs, None)
path = TorchPath(None, variant="brgemm")
got = path.linear(x, segments_of(slot), templates, coeffs, None)
auto = TorchPath(None)
half = auto.linear(x.bfloat16(), segments_of(slot), templates.bfloat16(), coeffs, None).float()
print(json.dumps({
    "fp32_error": float((got - want).abs().max()),
    "choices": list(path.choices().values()),
    "bf16_brgemm": cpu_ext.brgemm_runs(path.extension, torch.bfloat16),
    "bf16_error": float((half - want).norm() / want.norm()),
}))
"""


def test_brgemm_on_avx2_code_forced_on_this_cpu() -> None:
    """oneDNN capped at AVX2 (as on an AVX2-only CPU): float32 BRGEMM still exact, bfloat16 falls back."""
    result = subprocess.run(
        [sys.executable, "-c", LOWER_ISA_SCRIPT],
        env=os.environ | {"ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fp32_error"] < 1e-3 and report["choices"] == ["brgemm"], report
    assert report["bf16_brgemm"] is False, "oneDNN has no bfloat16 BRGEMM on AVX2: it must be refused"
    assert report["bf16_error"] < 1e-2, report


BF16_COMPOSE_SCRIPT = """
import json, torch
from kernels import reference, segments_of
from kernels.torch_path import TorchPath
gen = torch.Generator().manual_seed(2)
x, slot = torch.randn(300, 384, generator=gen), torch.randint(0, 7, (300,), generator=gen)
templates, coeffs = torch.randn(2, 1536, 384, generator=gen) / 20, torch.randn(7, 2, generator=gen)
x, templates = x.bfloat16(), templates.bfloat16()
want = reference.segmented_template_linear(x.float(), slot, templates.float(), coeffs, None)
got = TorchPath(None, variant="brgemm").linear(x, segments_of(slot), templates, coeffs, None)
torch.save(got, "OUT")
print(json.dumps({"error": float((got.float() - want).norm() / want.norm())}))
"""


@pytest.mark.skipif(not cpu_features.bf16_native(), reason="bfloat16 BRGEMM needs native bf16")
def test_brgemm_bfloat16_compose_loops(tmp_path: Path) -> None:
    """The bf16 compose runs on AVX512-BF16's conversion where the CPU has it and on the cloned loop
    otherwise (forced here with RECAST_NO_AVX512BF16): both within bf16 rounding of the reference and
    of each other."""
    outputs = {}
    for compose in ("avx512_bf16", "portable"):
        out = tmp_path / f"{compose}.pt"
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        env.pop("RECAST_NO_AVX512BF16", None)
        if compose == "portable":
            env["RECAST_NO_AVX512BF16"] = "1"
        result = subprocess.run(
            [sys.executable, "-c", BF16_COMPOSE_SCRIPT.replace("OUT", str(out))],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        assert json.loads(result.stdout.strip().splitlines()[-1])["error"] < 1e-2, compose
        outputs[compose] = torch.load(out).float()
    a, b = outputs["avx512_bf16"], outputs["portable"]
    assert (a - b).norm() / b.norm() < 1e-2


def test_fallback_without_the_compiled_kernel_matches_reference() -> None:
    path = TorchPath(None, use_extension=False)
    for rows, slots in ((64, 4), (65, 3)):  # equal runs take one bmm, unequal runs one GEMM per run
        x, slot, templates, coeffs, bias = _problem(37, 50, rows, slots)
        slot = torch.arange(rows) * slots // rows if rows == 64 else slot
        want = reference.segmented_template_linear(x, slot, templates, coeffs, bias)
        torch.testing.assert_close(path.linear(x, segments_of(slot), templates, coeffs, bias), want)


def test_empty_batch(fused: TorchPath) -> None:
    x, slot, templates, coeffs, bias = _problem(37, 50, 0, 3)
    assert fused.linear(x, segments_of(slot), templates, coeffs, bias).shape == (0, 37)


def test_one_task_batches_use_the_cache_and_a_plain_gemm() -> None:
    kernels = Kernels("cpu", path="torch", cache_bytes=1 << 20)
    x, _, templates, coeffs, bias = _problem(37, 50, 16, 3)
    slot = torch.full((16,), 2)
    keys = ["a", "b", "c"]
    first = kernels.linear(x, slot, templates, coeffs, bias, cache_keys=keys)
    second = kernels.linear(x, slot, templates, coeffs, bias, cache_keys=keys)
    plain = torch.nn.functional.linear(x, reference.compose(templates, coeffs[2:3])[0], bias)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert (kernels.cache.misses, kernels.cache.hits, len(kernels.cache)) == (1, 1, 1)


def test_cache_evicts_least_recently_used() -> None:
    cache = ComposedWeightCache(max_bytes=3 * 400)
    for key in "abc":
        cache.get_or_load(key, lambda: torch.zeros(100))
    cache.get_or_load("a", lambda: torch.ones(100))  # hit: 'a' becomes most recent
    cache.get_or_load("d", lambda: torch.zeros(100))  # evicts 'b'
    assert len(cache) == 3 and cache.nbytes == 1200
    assert torch.equal(
        cache.get_or_load("a", lambda: torch.ones(100)), torch.zeros(100)
    )  # still the cached one
    assert torch.equal(cache.get_or_load("b", lambda: torch.ones(100)), torch.ones(100))  # recomposed
    assert torch.equal(
        cache.get_or_load("huge", lambda: torch.ones(1000)), torch.ones(1000)
    )  # too big: not kept
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes


def test_segments_split_and_order() -> None:
    seg = segments_of(torch.tensor([2, 0, 2, 1, 0, 2, 2]))
    assert seg.order is not None and seg.order.tolist() == [1, 4, 3, 0, 2, 5, 6]
    assert seg.starts.tolist() == [0, 2, 3, 7] and seg.slots.tolist() == [0, 1, 2]
    split = seg.split(3)
    assert split.starts.tolist() == [0, 2, 3, 6, 7] and split.slots.tolist() == [0, 1, 2, 2]
    assert segments_of(torch.tensor([0, 0, 1])).order is None
    empty = segments_of(torch.zeros(0, dtype=torch.int64))
    assert isinstance(empty, Segments) and empty.count == 0 and empty.starts.tolist() == [0]


def test_dispatcher_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECAST_KERNEL", raising=False)
    assert select_path(torch.device("cpu")) is KernelPath.TORCH
    monkeypatch.setenv("RECAST_KERNEL", "reference")
    assert select_path(torch.device("cpu")) is KernelPath.REFERENCE
    assert Kernels("cpu").path is KernelPath.REFERENCE
    monkeypatch.setenv("RECAST_KERNEL", "fastest")
    with pytest.raises(KernelUnavailable, match="not one of reference, torch, triton"):
        select_path(torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailable, match="needs a CUDA device"):
        select_path(torch.device("cpu"), "triton")


def test_every_path_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECAST_KERNEL", raising=False)
    x, slot, templates, coeffs, bias = _problem(96, 64, 50, 6)
    want = reference.segmented_template_linear(x, slot, templates, coeffs, bias)
    for path in ("reference", "torch"):
        got = Kernels("cpu", path=path).linear(x, slot, templates, coeffs, bias)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="slot values"):
        Kernels("cpu", path="torch").linear(x, slot + 6, templates, coeffs, bias)


def test_packed_templates_layout_and_cache() -> None:
    templates = torch.randn(2, 37, 50)
    packed = pack(templates)
    assert packed.shape == (2, 3, 50, 16) and packed.is_contiguous()
    assert torch.equal(packed[1, 2, 7, :5], templates[1, 32:37, 7])
    assert not packed[:, 2, :, 5:].any(), "columns past out must be zero"
    cache = PackedTemplateCache(1 << 20)
    first = cache.get(templates)
    assert cache.get(templates) is first
    templates.mul_(2)  # an in-place change bumps the version: packed again
    again = cache.get(templates)
    assert again is not first and torch.equal(again, 2 * first)
    small = PackedTemplateCache(packed.numel() * 4)
    small.get(templates)
    small.get(torch.randn(2, 37, 50))
    assert small.nbytes == packed.numel() * 4, "the oldest packed copy is evicted past the budget"


def test_brgemm_layouts() -> None:
    templates = torch.randn(2, 37, 50)
    blocks = pack_blocks(templates, 16, vnni=False)
    assert blocks.shape == (2, 3, 50 * 16)
    view = blocks.view(2, 3, 50, 16)  # (k, column) row-major inside a block
    assert torch.equal(view[1, 2, 7, :5], templates[1, 32:37, 7]) and not view[:, 2, :, 5:].any()
    vnni = pack_blocks(templates.bfloat16(), 16, vnni=True).view(2, 3, 25, 16, 2)  # pairs of k per column
    assert torch.equal(vnni[0, 1, 3, 4], templates[0, 20, 6:8].bfloat16())
    with pytest.raises(ValueError, match="even in_features"):
        pack_blocks(torch.randn(2, 4, 5), 16, vnni=True)
    stacked = STACKED.pack(templates)
    assert stacked.shape == (74, 50) and torch.equal(stacked[37:], templates[1])
    cache = PackedTemplateCache(1 << 20)
    assert cache.get(templates, Layout("blocks", 16)) is cache.get(templates, Layout("blocks", 16))
    assert cache.get(templates, Layout("blocks", 32)).shape == (
        2,
        2,
        50 * 32,
    )  # another layout, its own entry


def test_microkernel_on_fused_qkv_row_slices(fused: TorchPath) -> None:
    x, slot, qkv, coeffs, _ = _problem(3 * 48, 40, rows=50, num_slots=5)
    for member in qkv.split(48, dim=1):  # non-contiguous (n, 48, 40) views of one template tensor
        want = reference.segmented_template_linear(x, slot, member, coeffs, None)
        torch.testing.assert_close(fused.linear(x, segments_of(slot), member, coeffs, None), want)


def _scale_shift(num_slots: int, out: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return 1 + 0.3 * torch.randn(num_slots, out, generator=gen), torch.randn(num_slots, out, generator=gen)


@pytest.mark.parametrize("shape", [(384, 1536), (37, 50)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("layout", ["random", "one_task", "all_different"])
def test_every_variant_applies_per_task_scale_and_shift(
    fused: TorchPath, shape: tuple[int, int], layout: str
) -> None:
    """(x W^T + b) * scale[slot] + shift[slot]: in BRGEMM's epilogue, after the other variants."""
    x, slot, templates, coeffs, bias = _problem(*shape, rows=300, num_slots=7)
    if layout == "one_task":
        slot = torch.full_like(slot, 2)
    elif layout == "all_different":
        x, slot = x[:7], torch.tensor([3, 0, 6, 1, 5, 2, 4])
    scale, shift = _scale_shift(7, shape[0])
    want = reference.segmented_template_linear(x, slot, templates, coeffs, bias, scale, shift)
    got = fused.linear(x, segments_of(slot), templates, coeffs, bias, scale=scale, shift=shift)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    only_scale = fused.linear(x, segments_of(slot), templates, coeffs, None, scale=scale)
    want_scale = reference.segmented_template_linear(x, slot, templates, coeffs, None, scale, None)
    torch.testing.assert_close(only_scale, want_scale, rtol=1e-5, atol=1e-4)
    if layout != "one_task":
        _ran(fused, fused.chooser.forced or "")


@pytest.mark.parametrize("variant", BFLOAT16_VARIANTS)
def test_bfloat16_variants_apply_scale_and_shift(variant: str) -> None:
    path = TorchPath(ComposedWeightCache(1 << 24), variant=variant)
    if variant not in path.variants(torch.bfloat16):
        pytest.skip("no native bfloat16 on this CPU: BRGEMM refuses it")
    x, slot, templates, coeffs, bias = _problem(384, 1536, rows=300, num_slots=7)
    scale, shift = _scale_shift(7, 384)
    x, templates, bias = x.bfloat16(), templates.bfloat16(), bias.bfloat16()
    want = reference.segmented_template_linear(
        x.float(), slot, templates.float(), coeffs, bias.float(), scale, shift
    )
    got = path.linear(x, segments_of(slot), templates, coeffs, bias, scale=scale, shift=shift)
    assert got.dtype == torch.bfloat16
    error = (got.float() - want).norm() / want.norm()
    assert error < 1e-2, f"relative error {error:.2e}"


@pytest.mark.parametrize("kernel_path", ["reference", "torch"])
def test_dispatcher_passes_scale_and_shift(kernel_path: str) -> None:
    x, slot, templates, coeffs, bias = _problem(37, 50, rows=40, num_slots=5)
    scale, shift = _scale_shift(5, 37)
    kernels = Kernels("cpu", path=kernel_path)
    want = reference.segmented_template_linear(x, slot, templates, coeffs, bias, scale, shift)
    got = kernels.linear(x, slot, templates, coeffs, bias, scale=scale, shift=shift)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="shift must be a float"):
        kernels.linear(x, slot, templates, coeffs, bias, shift=torch.zeros(4, 37))
