"""Serving on a CUDA device (skipped without one): placement, reduced-precision forwards, no host copy of
the bank, warm-up compiles every kernel the dispatcher can pick. Run on a GPU host: pytest -m gpu."""

from __future__ import annotations

import pytest
import torch

from kernels import Kernels
from recast_core.backbone import TextBackbone
from recast_core.bank import TemplateBank
from recast_core.multitask import SlotLinear
from server.serving.predictor import Predictor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
TEXTS = ["Who wrote Hamlet?", "free entry in a weekly prize draw", "see you at five", "ok"]


def _predictor(backbone: TextBackbone, bank: TemplateBank, dtype: torch.dtype) -> Predictor:
    return Predictor(backbone, bank, Kernels("cuda"), max_length=32, dtype=dtype)


def _embed(predictor: Predictor, bank: TemplateBank) -> torch.Tensor:
    base = bank.base_coefficients.mean(dim=1).float()
    tokens = predictor.backbone.tokenize(TEXTS, max_length=32)
    table = torch.stack([base, base * 0.9])
    return predictor.encoder(tokens["input_ids"], tokens["attention_mask"], torch.tensor([0, 1, 0, 1]), table)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_model_and_bank_live_on_the_device_in_the_serving_dtype(
    backbone: TextBackbone, default_bank: TemplateBank, dtype: torch.dtype
) -> None:
    predictor = _predictor(backbone, default_bank, dtype)
    tensors = [*predictor.encoder.parameters(), *predictor.encoder.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    assert all(t.device.type == "cuda" for t in tensors)
    assert all(t.dtype == dtype for t in floats)
    templates = [m.templates for m in predictor.encoder.modules() if isinstance(m, SlotLinear)]
    assert templates and all(t.is_cuda for t in templates)  # no host copy of the bank serves


@pytest.mark.parametrize(("dtype", "cosine"), [(torch.float16, 0.999), (torch.bfloat16, 0.995)])
def test_reduced_precision_forwards_match_float32(
    backbone: TextBackbone, default_bank: TemplateBank, dtype: torch.dtype, cosine: float
) -> None:
    full = _embed(_predictor(backbone, default_bank, torch.float32), default_bank).float()
    reduced = _embed(_predictor(backbone, default_bank, dtype), default_bank).float()
    assert torch.isfinite(reduced).all()
    assert float(torch.nn.functional.cosine_similarity(full, reduced).min()) > cosine


def _compiled() -> int:
    from kernels import triton_kernels as tk  # imported here: importing triton at collection would fix its
    # backend before the interpreter tests set TRITON_INTERPRET

    total = 0
    for kernel in (tk._segmented_kernel, tk._template_space_kernel):
        for cache in getattr(kernel, "device_caches", {}).values():
            total += len(cache[0])
    return total


def test_warm_up_compiles_what_requests_use(backbone: TextBackbone, default_bank: TemplateBank) -> None:
    predictor = _predictor(backbone, default_bank, torch.bfloat16)
    predictor.warm_up()
    compiled = _compiled()
    assert compiled >= 2  # both strategies
    _embed(predictor, default_bank)
    assert _compiled() == compiled, "a request compiled a kernel the warm-up did not"
