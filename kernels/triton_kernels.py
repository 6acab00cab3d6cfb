# @triton.jit kernels take untyped pointers and constexprs; the host wrappers below them are typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"
"""Triton kernels for the template mix (GPU; on CPU only under TRITON_INTERPRET=1, for tests).

    compose:          W[s] = sum_i coeffs[s, i] * templates[i]                 (distinct slots of a batch)
    fused segmented:  rows grouped by slot; each program composes its (BLOCK_N, BLOCK_K) weight tile from the
                      n template tiles in registers and multiplies it into its rows: per-task weights never
                      reach global memory
    template space:   for every row: sum_i coeffs[slot, i] * (x @ templates[i]^T), mixed in the epilogue
                      of one pass over all n templates (n x the FLOPs, no sorting; for many short segments)

fp32 accumulation everywhere; fp32 inputs multiply in IEEE fp32 (no TF32), fp16/bf16 inputs on tensor cores.
Launch configurations are fixed per device when the dispatcher starts (`launch_config`); no autotuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.checks import check_linear_args
from kernels.segments import Segments, segments_of


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3
    compose_block: int = 1024


def launch_config(device: torch.device) -> LaunchConfig:
    """One configuration per device, chosen once (datacenter GPUs get larger tiles)."""
    if device.type != "cuda":
        return LaunchConfig(
            block_m=32, block_n=128, block_k=128, num_warps=1, num_stages=1, compose_block=4096
        )
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8:
        return LaunchConfig(block_m=64, block_n=128, block_k=32, num_warps=4, num_stages=3)
    return LaunchConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2)


@triton.jit
def _compose_kernel(
    t_ptr,
    c_ptr,
    w_ptr,
    numel,
    stride_t,
    stride_cs,
    stride_ws,
    N_TEMPLATES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    s = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(N_TEMPLATES):
        c = tl.load(c_ptr + s * stride_cs + i).to(tl.float32)
        t = tl.load(t_ptr + i * stride_t + offs, mask=mask, other=0.0)
        acc += c * t.to(tl.float32)
    tl.store(w_ptr + s * stride_ws + offs, acc.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segmented_kernel(
    x_ptr,
    t_ptr,
    c_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    tile_row0_ptr,
    tile_row1_ptr,
    tile_slot_ptr,
    N,
    K,
    stride_xm,
    stride_t,
    stride_tn,
    stride_cs,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    N_TEMPLATES: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # one row tile of one segment
    pid_n = tl.program_id(1)
    row0 = tl.load(tile_row0_ptr + pid_m)
    row1 = tl.load(tile_row1_ptr + pid_m)
    slot = tl.load(tile_slot_ptr + pid_m)
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < row1
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        a = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for i in tl.static_range(N_TEMPLATES):
            c = tl.load(c_ptr + slot * stride_cs + i).to(tl.float32)
            t = tl.load(
                t_ptr + i * stride_t + rn[:, None] * stride_tn + kk[None, :],
                mask=mask_n[:, None] & mask_k[None, :],
                other=0.0,
            )
            w += c * t.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w.to(a.dtype)))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:  # the tile's task's per-channel output scale and shift ((S, N), row-major)
        acc *= tl.load(scale_ptr + slot * N + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + slot * N + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _template_space_kernel(
    x_ptr,
    t_ptr,
    c_ptr,
    slot_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_t,
    stride_tn,
    stride_cs,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    N_TEMPLATES: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    slots = tl.load(slot_ptr + rm, mask=mask_m, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        a = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        for i in tl.static_range(N_TEMPLATES):
            t = tl.load(
                t_ptr + i * stride_t + rn[:, None] * stride_tn + kk[None, :],
                mask=mask_n[:, None] & mask_k[None, :],
                other=0.0,
            )
            if IEEE:  # noqa: SIM108 (a compile-time branch of the Triton JIT)
                part = tl.dot(a, tl.trans(t), input_precision="ieee")
            else:
                part = tl.dot(a, tl.trans(t))
            c = tl.load(c_ptr + slots * stride_cs + i, mask=mask_m, other=0.0).to(tl.float32)
            acc += c[:, None] * part
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_SCALE:  # each row's task's per-channel output scale and shift ((S, N), row-major)
        acc *= tl.load(scale_ptr + slots[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + slots[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _rows_contiguous(templates: torch.Tensor) -> torch.Tensor:
    """Each template must be a row-major (out, in) matrix; the template stride may be anything."""
    if templates.stride(2) == 1 and templates.stride(1) == templates.shape[2]:
        return templates
    return templates.contiguous()


def compose(
    templates: torch.Tensor, coeffs: torch.Tensor, config: LaunchConfig | None = None
) -> torch.Tensor:
    """W (S, out, in): templates (n, out, in) mixed by coeffs (S, n); reference: reference.compose."""
    if templates.ndim != 3 or coeffs.ndim != 2 or coeffs.shape[1] != templates.shape[0]:
        raise ValueError(
            f"coeffs must be (S, {templates.shape[0]}) and templates (n, out, in); "
            f"got {tuple(coeffs.shape)} and {tuple(templates.shape)}"
        )
    if coeffs.device != templates.device:
        raise ValueError("templates and coeffs must be on one device")
    config = config or launch_config(templates.device)
    templates = _rows_contiguous(templates)
    coeffs = coeffs.to(torch.float32).contiguous()
    s, (n, out, in_features) = coeffs.shape[0], templates.shape
    w = torch.empty(s, out, in_features, dtype=templates.dtype, device=templates.device)
    numel = out * in_features
    if s == 0 or numel == 0:
        return w
    grid = (s, triton.cdiv(numel, config.compose_block))
    _compose_kernel[grid](
        templates,
        coeffs,
        w,
        numel,
        templates.stride(0),
        coeffs.stride(0),
        w.stride(0),
        N_TEMPLATES=n,
        BLOCK=config.compose_block,
        num_warps=config.num_warps,
    )
    return w


def _epilogue_rows(
    scale: torch.Tensor | None, shift: torch.Tensor | None, placeholder: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major float32 (S, out) scale and shift for the kernels (`placeholder` where absent: unread)."""

    def rows(part: torch.Tensor | None) -> torch.Tensor:
        return placeholder if part is None else part.to(torch.float32).contiguous()

    return rows(scale), rows(shift)


def _row_tiles(segments: Segments, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row0, row1, slot) of every BLOCK_M-row tile of every segment."""
    split = segments.split(block_m)
    return split.starts[:-1].contiguous(), split.starts[1:].contiguous(), split.slots.contiguous()


def fused_segmented_linear(
    x: torch.Tensor,
    slot: torch.Tensor,
    templates: torch.Tensor,
    coeffs: torch.Tensor,
    bias: torch.Tensor | None,
    config: LaunchConfig | None = None,
    segments: Segments | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The contract by strategy (a); reference: kernels.reference.fused_segmented_linear."""
    check_linear_args(x, slot, templates, coeffs, bias, scale=scale, shift=shift)
    config = config or launch_config(x.device)
    segments = segments or segments_of(slot)
    n, out, in_features = templates.shape
    xs = segments.gather(x).contiguous()
    y = torch.empty(x.shape[0], out, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or out == 0:
        return y
    templates = _rows_contiguous(templates)
    coeffs = coeffs.to(torch.float32).contiguous()
    row0, row1, tile_slot = _row_tiles(segments, config.block_m)
    grid = (row0.numel(), triton.cdiv(out, config.block_n))
    _segmented_kernel[grid](
        xs,
        templates,
        coeffs,
        bias if bias is not None else y,
        *_epilogue_rows(scale, shift, y),
        y,
        row0,
        row1,
        tile_slot,
        out,
        in_features,
        xs.stride(0),
        templates.stride(0),
        templates.stride(1),
        coeffs.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        N_TEMPLATES=n,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return segments.scatter(y)


def template_space_linear(
    x: torch.Tensor,
    slot: torch.Tensor,
    templates: torch.Tensor,
    coeffs: torch.Tensor,
    bias: torch.Tensor | None,
    config: LaunchConfig | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The contract by strategy (b); reference: kernels.reference.template_space_linear."""
    check_linear_args(x, slot, templates, coeffs, bias, scale=scale, shift=shift)
    config = config or launch_config(x.device)
    n, out, in_features = templates.shape
    x = x.contiguous()
    y = torch.empty(x.shape[0], out, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or out == 0:
        return y
    templates = _rows_contiguous(templates)
    coeffs = coeffs.to(torch.float32).contiguous()
    grid = (triton.cdiv(x.shape[0], config.block_m), triton.cdiv(out, config.block_n))
    _template_space_kernel[grid](
        x,
        templates,
        coeffs,
        slot.contiguous(),
        bias if bias is not None else y,
        *_epilogue_rows(scale, shift, y),
        y,
        x.shape[0],
        out,
        in_features,
        x.stride(0),
        templates.stride(0),
        templates.stride(1),
        coeffs.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        N_TEMPLATES=n,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y
