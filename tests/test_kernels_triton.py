"""Every Triton kernel against its torch reference; on CPU under TRITON_INTERPRET=1 (exact, slow)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

triton = pytest.importorskip("triton")

from kernels import reference  # noqa: E402
from kernels import triton_kernels as tk  # noqa: E402
from recast_core.backbone import TextBackbone  # noqa: E402
from recast_core.bank import TemplateBank  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"
# (out, in) of MiniLM's layers (attention 384x384, fused qkv 1152x384, FFN in and out) plus an odd size
SHAPES = [(384, 384), (1152, 384), (1536, 384), (384, 1536), (37, 50)]
# absolute tolerance relative to the output's scale, keyed by dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
LINEAR_KERNELS = {
    "fused_segmented": (tk.fused_segmented_linear, reference.fused_segmented_linear),
    "template_space": (tk.template_space_linear, reference.template_space_linear),
}


def _dtypes() -> list[torch.dtype]:
    dtypes = [torch.float32, torch.float16]
    if not INTERPRETED:
        dtypes.append(torch.bfloat16)  # numpy has no bfloat16: the interpreter's tl.dot cannot run it
    return dtypes


def _slots(kind: str, rows: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "one_task":
        return torch.full((rows,), num_slots - 1, dtype=torch.int64)
    if kind == "all_different":
        return torch.randperm(rows, generator=gen) % num_slots
    return torch.randint(0, num_slots, (rows,), generator=gen)


def _problem(
    out: int, in_features: int, rows: int, kind: str, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    num_slots = rows if kind == "all_different" else 5
    templates = torch.randn(2, out, in_features, generator=gen) / in_features**0.5
    coeffs = torch.randn(max(num_slots, 1), 2, generator=gen)
    x = torch.randn(rows, in_features, generator=gen)
    bias = torch.randn(out, generator=gen)
    slot = _slots(kind, rows, max(num_slots, 1), gen)
    return tuple(t.to(DEVICE) for t in (x.to(dtype), slot, templates.to(dtype), coeffs, bias.to(dtype)))


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(1.0, float(want.float().abs().max())) if want.numel() else 1.0
    err = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
    assert err <= TOLERANCE[dtype] * scale * 10, f"max error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["random", "one_task", "all_different"])
@pytest.mark.parametrize("name", sorted(LINEAR_KERNELS))
def test_linear_kernels_match_reference_fp32(name: str, kind: str, shape: tuple[int, int]) -> None:
    kernel, ref = LINEAR_KERNELS[name]
    big = shape[0] * shape[1] > 10**5  # the interpreter runs every program in numpy: keep real shapes short
    rows = (6 if kind == "all_different" else 12) if big else 40
    x, slot, templates, coeffs, bias = _problem(*shape, rows, kind, torch.float32)
    want = ref(x, slot, templates, coeffs, bias)
    _close(kernel(x, slot, templates, coeffs, bias), want, torch.float32)
    # the strategy reference agrees with the contract itself
    _close(want, reference.segmented_template_linear(x, slot, templates, coeffs, bias), torch.float32)
    if not big:
        _close(kernel(x, slot, templates, coeffs, None), ref(x, slot, templates, coeffs, None), torch.float32)


@pytest.mark.parametrize("dtype", _dtypes(), ids=str)
@pytest.mark.parametrize("name", sorted(LINEAR_KERNELS))
def test_linear_kernels_half_precision(name: str, dtype: torch.dtype) -> None:
    kernel, _ = LINEAR_KERNELS[name]
    x, slot, templates, coeffs, bias = _problem(37, 50, 33, "random", dtype, seed=1)
    want = reference.segmented_template_linear(x.float(), slot, templates.float(), coeffs, bias.float()).to(
        dtype
    )
    _close(kernel(x, slot, templates, coeffs, bias), want, dtype)


@pytest.mark.parametrize("name", sorted(LINEAR_KERNELS))
def test_empty_batch(name: str) -> None:
    kernel, _ = LINEAR_KERNELS[name]
    x, slot, templates, coeffs, bias = _problem(37, 50, 0, "random", torch.float32)
    y = kernel(x, slot, templates, coeffs, bias)
    assert y.shape == (0, 37)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(384, 384), (37, 50)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_compose_matches_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    templates = torch.randn(3, *shape, generator=gen).to(dtype).to(DEVICE)
    coeffs = torch.randn(4, 3, generator=gen).to(DEVICE)
    want = reference.compose(templates.float(), coeffs).to(dtype)
    _close(tk.compose(templates, coeffs), want, dtype)
    assert tk.compose(templates, coeffs[:0]).shape == (0, *shape)


def test_template_row_slices_are_accepted() -> None:
    """Members of a fused kind read a row slice of the fused templates (a non-contiguous view)."""
    x, slot, fused, coeffs, _ = _problem(96, 50, 20, "random", torch.float32)
    member = fused[:, 32:64]
    for kernel, ref in LINEAR_KERNELS.values():
        _close(kernel(x, slot, member, coeffs, None), ref(x, slot, member, coeffs, None), torch.float32)


def test_wrappers_reject_bad_arguments() -> None:
    x, slot, templates, coeffs, bias = _problem(37, 50, 8, "random", torch.float32)
    for kernel, _ in LINEAR_KERNELS.values():
        with pytest.raises(ValueError, match="features"):
            kernel(x[:, :49], slot, templates, coeffs, bias)
        with pytest.raises(ValueError, match="slot values"):
            kernel(x, slot + 100, templates, coeffs, bias)
        with pytest.raises(ValueError, match="bias"):
            kernel(x, slot, templates, coeffs, bias[:3])
    with pytest.raises(ValueError, match="coeffs must be"):
        tk.compose(templates, coeffs[:, :1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_dispatcher_picks_triton() -> None:
    from kernels import KernelPath, Kernels

    kernels = Kernels("cuda")
    assert kernels.path is KernelPath.TRITON
    x, slot, templates, coeffs, bias = _problem(384, 384, 256, "random", torch.float32)
    _close(
        kernels.linear(x, slot, templates, coeffs, bias),
        reference.segmented_template_linear(x, slot, templates, coeffs, bias),
        torch.float32,
    )


@pytest.mark.parametrize("kind", ["ffn_in", "ffn_out"])
def test_base_coefficients_reproduce_the_backbone_layer(
    kind: str, backbone: TextBackbone, default_bank: TemplateBank
) -> None:
    """With the bank's base coefficients, every kernel gives MiniLM's own layer output (layer 3)."""
    from recast_core.plan import resolve_plan

    plan = resolve_plan(backbone.model, default_bank.config)
    kind_plan = next(kp for kp in plan.kinds if kp.kind.name == kind)
    layer = 3
    module = backbone.model.get_submodule(kind_plan.modules[layer][0])
    slot_index = [kp.kind.name for kp in plan.kinds].index(kind) * len(kind_plan.modules) + layer
    coeffs = default_bank.base_coefficients[slot_index].mean(dim=0, keepdim=True)  # (1, n)
    templates = default_bank.template(kind, kind_plan.group_of(layer))
    x = torch.randn(10, module.in_features, generator=torch.Generator().manual_seed(3))
    slot = torch.zeros(10, dtype=torch.int64)
    with torch.no_grad():
        want = module(x)
        for kernel, _ in LINEAR_KERNELS.values():
            got = kernel(
                x.to(DEVICE), slot.to(DEVICE), templates.to(DEVICE), coeffs.to(DEVICE), module.bias.to(DEVICE)
            )
            torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def _scale_shift(rows: int, out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (1 + 0.3 * torch.randn(rows, out, generator=gen)).to(DEVICE), torch.randn(
        rows, out, generator=gen
    ).to(DEVICE)


@pytest.mark.parametrize("parts", ["scale", "shift", "both"])
@pytest.mark.parametrize("kind", ["random", "one_task", "all_different"])
@pytest.mark.parametrize("name", sorted(LINEAR_KERNELS))
def test_linear_kernels_per_task_scale_and_shift(name: str, kind: str, parts: str) -> None:
    """The optional (S, out) per-task output scale and shift, applied in the kernels' epilogue."""
    kernel, ref = LINEAR_KERNELS[name]
    x, slot, templates, coeffs, bias = _problem(37, 50, 24, kind, torch.float32, seed=2)
    scale, shift = _scale_shift(coeffs.shape[0], 37, seed=3)
    scale = scale if parts in ("scale", "both") else None
    shift = shift if parts in ("shift", "both") else None
    want = reference.segmented_template_linear(x, slot, templates, coeffs, bias, scale, shift)
    _close(kernel(x, slot, templates, coeffs, bias, scale=scale, shift=shift), want, torch.float32)
    _close(ref(x, slot, templates, coeffs, bias, scale, shift), want, torch.float32)
    plain = reference.segmented_template_linear(x, slot, templates, coeffs, bias)
    assert not torch.allclose(want, plain), "the scale and shift must change the output"
    with pytest.raises(ValueError, match="scale must be a float"):
        kernel(x, slot, templates, coeffs, bias, scale=torch.ones(coeffs.shape[0], 36, device=DEVICE))
