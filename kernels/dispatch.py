"""Pick the kernel path once at startup: CUDA -> Triton, CPU -> torch fast path; RECAST_KERNEL forces one.

    RECAST_KERNEL=reference  the torch reference (slow; for debugging and as ground truth)
    RECAST_KERNEL=torch      CPU fast path: composed-weight cache + fused variants chosen by measurement
                             (kernels.torch_path; RECAST_CPU_VARIANT forces one)
    RECAST_KERNEL=triton     Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1 for tests)

Within the Triton path the strategy is picked per call by shape: runs of at least `block_m // 2` rows on
average go to the fused segmented GEMM, shorter runs (many tasks, few rows each) to template space.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Sequence
from enum import StrEnum

import torch

from kernels import reference
from kernels.checks import check_linear_args
from kernels.segments import Segments, segments_of
from kernels.weight_cache import ComposedWeightCache

log = logging.getLogger(__name__)
ENV_VAR = "RECAST_KERNEL"
DEFAULT_CACHE_BYTES = 256 << 20


class KernelPath(StrEnum):
    REFERENCE = "reference"
    TORCH = "torch"
    TRITON = "triton"


class KernelUnavailable(RuntimeError):
    """The requested kernel path cannot run on this machine."""


def select_path(device: torch.device, requested: str | None = None) -> KernelPath:
    """The path for `device`; `requested` (default: $RECAST_KERNEL) overrides the device's choice."""
    requested = requested if requested is not None else os.environ.get(ENV_VAR) or None
    if requested is not None:
        try:
            path = KernelPath(requested.strip().lower())
        except ValueError:
            choices = ", ".join(p.value for p in KernelPath)
            raise KernelUnavailable(f"{ENV_VAR}={requested!r} is not one of {choices}") from None
    else:
        path = KernelPath.TRITON if device.type == "cuda" else KernelPath.TORCH
    if path is KernelPath.TRITON:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not interpreted:
            raise KernelUnavailable("the triton path needs a CUDA device (or TRITON_INTERPRET=1 for tests)")
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise KernelUnavailable(f"the triton path needs the triton package: {exc}") from None
    if path is KernelPath.TORCH and device.type != "cpu":
        raise KernelUnavailable(f"the torch fast path serves CPU tensors, not {device.type}")
    return path


class Kernels:
    """The segmented template linear on one device through one path, chosen once."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        path: KernelPath | str | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.device = torch.device(device)
        self.path = select_path(self.device, None if path is None else str(path))
        self.cache = ComposedWeightCache(cache_bytes)
        self._torch = None
        self._triton_config = None
        detail = ""
        if self.path is KernelPath.TORCH:
            from kernels import cpu_ext
            from kernels.torch_path import TorchPath
            from kernels.variant_choice import UnknownVariant

            try:
                self._torch = TorchPath(self.cache)
            except UnknownVariant as exc:
                raise KernelUnavailable(str(exc)) from None
            forced = self._torch.chooser.forced
            how = f"forced {forced}" if forced else "variant measured per shape and dtype"
            detail = (
                f"fused compiled kernels, {how}"
                if self._torch.extension is not None
                else f"no compiled kernel ({cpu_ext.unavailable_reason() or 'disabled'})"
            )
        elif self.path is KernelPath.TRITON:
            from kernels.triton_kernels import launch_config

            self._triton_config = launch_config(self.device)
            detail = str(self._triton_config)
        log.info("kernel path selected", extra={"kernel_path": self.path.value, "detail": detail})
        self.detail = detail

    def variant_choices(self) -> dict[str, str]:
        """CPU fast path: the variant every kind of call seen so far runs (empty on other paths)."""
        return {} if self._torch is None else self._torch.choices()

    def linear(
        self,
        x: torch.Tensor,
        slot: torch.Tensor,
        templates: torch.Tensor,
        coeffs: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        segments: Segments | None = None,
        cache_keys: Sequence[Hashable] | None = None,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y[t] = (x[t] @ (sum_i coeffs[slot[t], i] * templates[i])^T + bias) * scale[slot[t]]
        + shift[slot[t]] (the contract: kernels.reference.segmented_template_linear; scale and shift (S, out)
        are optional).

        `segments` (the layout of `slot`, shared by every layer of one batch) saves recomputing it;
        `cache_keys[s]` names slot s's composed weight in the cache (immutable inputs only).
        """
        if self.path is KernelPath.REFERENCE:
            return reference.segmented_template_linear(x, slot, templates, coeffs, bias, scale, shift)
        if segments is None:
            check_linear_args(x, slot, templates, coeffs, bias, scale=scale, shift=shift)
            segments = segments_of(slot)
        if self._torch is not None:
            return self._torch.linear(x, segments, templates, coeffs, bias, cache_keys, scale, shift)
        from kernels import triton_kernels

        config = self._triton_config
        assert config is not None
        if segments.count and x.shape[0] / segments.count < config.block_m // 2:
            return triton_kernels.template_space_linear(
                x, slot, templates, coeffs, bias, config, scale=scale, shift=shift
            )
        return triton_kernels.fused_segmented_linear(
            x, slot, templates, coeffs, bias, config, segments, scale=scale, shift=shift
        )
