"""Neural Mimicry: fit shared templates and per-layer coefficients that reproduce a backbone's weights.

Two methods:
- "svd": per (group, kind) the least-squares optimum in closed form. Stack the group's L_g flattened
  fused weights as rows of A (L_g, D); the truncated SVD A ~ U_n S_n V_n^T gives templates
  S_n V_n^T / sqrt(L_g) and coefficients U_n sqrt(L_g) (so coefficients are O(1)). Exact when n >= L_g.
- "paper": the official RECAST procedure, reproduced for comparison: Kaiming-normal templates, unit-norm
  random (orthogonal-initialised) coefficient sets, Smooth L1 loss (weight 2.0 per module), coefficient
  noise 1e-4, RMSprop lr 0.1, StepLR(200, 0.1), 1000 full-batch iterations, gradient clipping at 1.0,
  keeping the lowest-loss iterate.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kernels import compose
from recast_core.bank import TemplateBank, template_key
from recast_core.config import RecastConfig
from recast_core.fingerprint import backbone_fingerprint
from recast_core.plan import KindPlan, ModulePlan, resolve_plan
from recast_core.reparam import planned_weight_names, reparameterize

Method = Literal["svd", "paper"]
Probe = Callable[[nn.Module], torch.Tensor]
METHODS: tuple[str, ...] = ("svd", "paper")


@dataclass(frozen=True)
class PaperSchedule:
    """The official reconstruction hyper-parameters."""

    iterations: int = 1000
    lr: float = 0.1
    step_size: int = 200
    gamma: float = 0.1
    clip: float = 1.0
    loss_weight: float = 2.0
    coefficient_noise: float = 1e-4


@dataclass(frozen=True)
class MimicryReport:
    method: str
    config: dict[str, Any]
    seconds: float
    per_layer: list[dict[str, Any]]
    per_group: list[dict[str, Any]]
    max_relative_error: float
    mean_relative_error: float
    output_cosine: float | None
    output_cosine_min: float | None
    output_max_abs_diff: float | None
    sample_size: int | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class MimicryResult:
    bank: TemplateBank
    report: MimicryReport

    @property
    def base_coefficients(self) -> torch.Tensor:
        """(M, K, n) base coefficients (owned by the bank)."""
        return self.bank.base_coefficients


def stacked_weights(model: nn.Module, kp: KindPlan) -> torch.Tensor:
    """(L, *fused_shape) float64: per layer the members' weights stacked along the output dimension."""
    named = dict(model.named_modules())
    return torch.stack(
        [
            torch.cat([named[name].weight.detach().to(torch.float64) for name in row], dim=0)
            for row in kp.modules
        ]
    )


def _svd_group(
    weights: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """weights (L_g, *w) -> templates (n, *w), coefficients (L_g, n); least-squares optimal."""
    layers = weights.shape[0]
    a = weights.reshape(layers, -1)  # (L_g, D)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)  # u (L_g, r), s (r,), vh (r, D)
    r = min(n, s.shape[0])
    scale = math.sqrt(layers)
    templates = torch.zeros(n, a.shape[1], dtype=torch.float64)
    coeffs = torch.zeros(layers, n, dtype=torch.float64)
    signs = torch.sign(u[:, :r].sum(dim=0))
    signs[signs == 0] = 1.0
    templates[:r] = (s[:r, None] * vh[:r]) * signs[:, None] / scale
    coeffs[:, :r] = u[:, :r] * signs[None, :] * scale
    if n > r:
        # More templates than layers: extra directions orthogonal to the fitted ones, with the RMS norm of
        # the fitted templates and zero base coefficients. They leave the backbone exact and give tasks
        # room to move.
        extra = torch.randn(n - r, a.shape[1], generator=generator, dtype=torch.float64)
        basis = vh[:r]
        extra = extra - (extra @ basis.T) @ basis
        extra = torch.linalg.qr(extra.T).Q.T  # orthonormal rows
        norm = templates[:r].norm(dim=1).pow(2).mean().sqrt()
        templates[r:] = extra * norm
    return templates.reshape(n, *weights.shape[1:]), coeffs


def _fit_svd(
    model: nn.Module, plan: ModulePlan, progress: bool, seed: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    config = plan.config
    generator = torch.Generator().manual_seed(seed)
    templates: dict[str, torch.Tensor] = {}
    rows: list[torch.Tensor] = []
    pairs = [(kp, g) for kp in plan.kinds for g in range(len(kp.groups))]
    coeffs_by_kind: dict[str, list[torch.Tensor]] = {kp.kind.name: [] for kp in plan.kinds}
    for kp, g in tqdm(pairs, desc="mimicry (svd)", disable=not progress, unit="bank"):
        weights = stacked_weights(model, kp)[list(kp.groups[g])]
        t, c = _svd_group(weights, config.templates, generator)
        templates[template_key(kp.kind.name, g)] = t
        coeffs_by_kind[kp.kind.name].append(c)
    for kp in plan.kinds:
        rows.append(torch.cat(coeffs_by_kind[kp.kind.name], dim=0))  # (L, n) in layer order
    collapsed = torch.cat(rows, dim=0)  # (M, n)
    base = collapsed.unsqueeze(1).repeat(1, config.coeff_sets, 1)  # (M, K, n)
    return templates, base, {}


def _fit_paper(
    model: nn.Module, plan: ModulePlan, progress: bool, seed: int, schedule: PaperSchedule
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    config = plan.config
    n, k = config.templates, config.coeff_sets
    torch.manual_seed(seed)
    # One entry per (kind, group): flattened targets (L_g, D), templates (n, D), coefficient sets (L_g, K, n).
    keys: list[str] = []
    shapes: list[tuple[int, ...]] = []
    targets: list[torch.Tensor] = []
    bank_params: list[nn.Parameter] = []
    coeff_params: list[nn.Parameter] = []
    for kp in plan.kinds:
        weights = stacked_weights(model, kp).to(torch.float32)
        fused = len(kp.kind.members) > 1
        for g, positions in enumerate(kp.groups):
            t = torch.empty(n, *kp.weight_shape)
            for i in range(n):
                if fused:  # the official attention bank: fan_out, relu
                    nn.init.kaiming_normal_(t[i], mode="fan_out", nonlinearity="relu")
                else:  # the official MLP and conv banks: defaults
                    nn.init.kaiming_normal_(t[i])
            sets = torch.empty(len(positions), k, n, 1)
            for p in range(len(positions)):
                for j in range(k):
                    nn.init.orthogonal_(sets[p, j])  # a random unit vector, as on the official (n, 1, 1)
            keys.append(template_key(kp.kind.name, g))
            shapes.append(kp.weight_shape)
            targets.append(weights[list(positions)].reshape(len(positions), -1))
            bank_params.append(nn.Parameter(t.reshape(n, -1)))
            coeff_params.append(nn.Parameter(sets.squeeze(-1)))
    params = bank_params + coeff_params
    optimizer = torch.optim.RMSprop(params, lr=schedule.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=schedule.step_size, gamma=schedule.gamma)
    best_loss = math.inf
    best: list[torch.Tensor] = []
    history: list[float] = []
    bar = tqdm(range(schedule.iterations), desc="mimicry (paper)", disable=not progress, unit="it")
    for it in bar:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for target, templates, coeff in zip(targets, bank_params, coeff_params, strict=True):
            noisy = coeff + torch.randn_like(coeff) * schedule.coefficient_noise  # (L_g, K, n)
            # mean over the K sets before mixing: compose is linear, so this equals the mean of the K weights
            weight = noisy.mean(dim=1) @ templates  # (L_g, D)
            per_module = F.smooth_l1_loss(weight, target, reduction="sum") / target.shape[1]
            total = total + per_module * schedule.loss_weight
        loss = float(total.detach())
        history.append(loss)
        if loss < best_loss:
            best_loss = loss
            best = [p.detach().clone() for p in params]
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=schedule.clip)
        optimizer.step()
        scheduler.step()
        if it % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3e}")
    templates_out = {
        key: best[i].reshape(n, *shape).to(torch.float64)
        for i, (key, shape) in enumerate(zip(keys, shapes, strict=True))
    }
    # coefficient rows back into canonical slot order (kind, then layer): groups are consecutive runs
    base = torch.cat(best[len(keys) :], dim=0).to(torch.float64)  # (M, K, n)
    return templates_out, base, {"best_loss": best_loss, "loss_every_100": history[::100]}


def _weight_errors(
    model: nn.Module, plan: ModulePlan, templates: dict[str, torch.Tensor], base: torch.Tensor
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    per_layer: list[dict[str, Any]] = []
    per_group: list[dict[str, Any]] = []
    slot = 0
    collapsed = base.to(torch.float64).mean(dim=1)  # (M, n)
    for kp in plan.kinds:
        weights = stacked_weights(model, kp)
        err_sq = [0.0] * len(kp.groups)
        norm_sq = [0.0] * len(kp.groups)
        for position, layer in enumerate(kp.layers):
            g = kp.group_of(position)
            t = templates[template_key(kp.kind.name, g)].to(torch.float64)
            approx = compose(t, collapsed[slot : slot + 1])[0]
            diff = float((approx - weights[position]).norm())
            norm = float(weights[position].norm())
            err_sq[g] += diff**2
            norm_sq[g] += norm**2
            per_layer.append(
                {"kind": kp.kind.name, "layer": layer, "group": g, "relative_error": diff / max(norm, 1e-30)}
            )
            slot += 1
        for g in range(len(kp.groups)):
            per_group.append(
                {
                    "kind": kp.kind.name,
                    "group": g,
                    "layers": [kp.layers[p] for p in kp.groups[g]],
                    "relative_error": math.sqrt(err_sq[g] / max(norm_sq[g], 1e-30)),
                }
            )
    return per_layer, per_group


def output_agreement(original: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Cosine per sample (mean and min) and max absolute difference between two (B, ...) outputs."""
    a = original.reshape(original.shape[0], -1).to(torch.float64)
    b = approx.reshape(approx.shape[0], -1).to(torch.float64)
    cos = F.cosine_similarity(a, b, dim=1)
    return {
        "output_cosine": float(cos.mean()),
        "output_cosine_min": float(cos.min()),
        "output_max_abs_diff": float((a - b).abs().max()),
    }


def mimic(
    model: nn.Module,
    config: RecastConfig,
    method: Method = "svd",
    *,
    probe: Probe | None = None,
    progress: bool = True,
    seed: int = 0,
    schedule: PaperSchedule | None = None,
) -> MimicryResult:
    """Fit a TemplateBank (and base coefficients) to `model`; `model` itself is left unchanged.

    `probe(model) -> (B, ...)` runs a model on a fixed sample; when given, the report compares the
    original and the reparameterized model's outputs on it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    plan = resolve_plan(model, config)
    start = time.perf_counter()
    with torch.no_grad() if method == "svd" else torch.enable_grad():
        if method == "svd":
            templates, base, extra = _fit_svd(model, plan, progress, seed)
        else:
            templates, base, extra = _fit_paper(model, plan, progress, seed, schedule or PaperSchedule())
    seconds = time.perf_counter() - start
    bank = TemplateBank.create(
        config,
        plan.describe(),
        templates,
        base,
        backbone_fingerprint(model, planned_weight_names(plan)),
    )
    per_layer, per_group = _weight_errors(model, plan, bank.templates, bank.base_coefficients)
    errors = [row["relative_error"] for row in per_layer]
    agreement: dict[str, float | None] = {
        "output_cosine": None,
        "output_cosine_min": None,
        "output_max_abs_diff": None,
    }
    sample_size = None
    if probe is not None:
        with torch.no_grad():
            reference = probe(model)
            twin = reparameterize(copy.deepcopy(model), bank)
            agreement.update(output_agreement(reference, probe(twin.model)))
        sample_size = int(reference.shape[0])
    report = MimicryReport(
        method=method,
        config=config.to_dict(),
        seconds=seconds,
        per_layer=per_layer,
        per_group=per_group,
        max_relative_error=max(errors),
        mean_relative_error=sum(errors) / len(errors),
        output_cosine=agreement["output_cosine"],
        output_cosine_min=agreement["output_cosine_min"],
        output_max_abs_diff=agreement["output_max_abs_diff"],
        sample_size=sample_size,
        extra=extra,
    )
    return MimicryResult(bank=bank, report=report)
