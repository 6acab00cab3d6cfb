"""The training loop's schedule and learning-rate choice, on a small tensor problem (no backbone)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from recast_core.errors import ConfigError
from recast_core.fitting import Examples, evaluate, fit, fit_choosing_lr, lr_factor, tensor_examples
from recast_core.train_options import TrainOptions


def test_lr_factor_warms_up_then_decays_to_zero() -> None:
    total, warmup = 100, 0.1
    factors = [lr_factor(step, total, warmup, "cosine") for step in range(total + 1)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # 10 warm-up steps
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5)  # half-way through the decay
    assert factors[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert [lr_factor(s, total, 0.0, "constant") for s in (0, 50, 99)] == [1.0, 1.0, 1.0]


def test_options_refuse_bad_recipes() -> None:
    with pytest.raises(ConfigError, match="lr_grid must hold positive"):
        TrainOptions(lr_grid=())
    with pytest.raises(ConfigError, match="schedule must be one of"):
        TrainOptions(schedule="step")
    with pytest.raises(ConfigError, match="warmup must be in"):
        TrainOptions(warmup=1.0)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        TrainOptions(lr=0.0)
    decoded: dict[str, Any] = {"lr_grid": [0.1, 0.2]}  # as the job worker gets it, from JSON
    from_json = TrainOptions(**decoded)
    assert from_json.lr_grid == (0.1, 0.2)


class Scaled(nn.Module):
    """A fixed random projection with one trainable gain per feature, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.projection = nn.Parameter(torch.randn(8, 8, generator=gen), requires_grad=False)
        self.gain = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head((x @ self.projection) * self.gain)
        return out


def _data(n: int, seed: int) -> Examples:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] * x[:, 1] > 0).long()  # needs the gains to move to be learnt well
    return tensor_examples(x, y)


def _groups(model: Scaled) -> Callable[[float], list[dict[str, object]]]:
    def groups(lr: float) -> list[dict[str, object]]:
        return [
            {"params": [model.gain], "lr": lr},
            {"params": list(model.head.parameters()), "lr": 1e-3},
        ]

    return groups


def test_lr_choice_trials_from_one_start_and_reruns_the_winner() -> None:
    """Every trial starts from the same parameters; the full run is exactly a plain fit at the chosen lr
    from that start; the state kept is the better-validated of that run and the winning trial."""
    train, val = _data(256, 0), _data(128, 1)
    options = TrainOptions(epochs=3, batch_size=32, lr_grid=(1e-4, 3e-2, 3.0), select_epochs=1, seed=5)
    torch.manual_seed(0)
    model = Scaled()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[tuple[int, int]] = []
    chosen = fit_choosing_lr(
        model, _groups(model), train, val, options, False, lambda _, done, total: seen.append((done, total))
    )
    assert chosen.lr in options.lr_grid
    assert set(chosen.lr_trials) == {"0.0001", "0.03", "3"}
    assert chosen.lr_trials[f"{chosen.lr:g}"] == max(chosen.lr_trials.values())
    steps = math.ceil(256 / 32)
    assert seen[-1] == (3 * 1 * steps + 3 * steps, 3 * 1 * steps + 3 * steps)  # trials counted in progress
    assert [done for done, _ in seen] == list(range(1, seen[-1][0] + 1))

    again = Scaled()
    again.load_state_dict(start)
    direct = fit(again, _groups(again)(chosen.lr), train, val, options, progress=False)
    kept = (chosen.val_accuracy, -chosen.val_loss)
    assert kept >= (direct.val_accuracy, -direct.val_loss)
    assert chosen.val_accuracy >= chosen.lr_trials[f"{chosen.lr:g}"] - 1e-6  # reported rounded
    assert evaluate(model, val)[0] == chosen.val_accuracy  # the model is left in the state reported
    if not chosen.from_trial:
        assert direct.best_epoch == chosen.best_epoch
        assert torch.equal(again.gain, model.gain) and torch.equal(again.head.weight, model.head.weight)


def test_a_trial_better_than_the_full_run_is_kept() -> None:
    """One epoch at a huge rate (the trial) can beat three at it (the full run): the trial's state is kept."""
    train, val = _data(256, 0), _data(128, 1)
    for seed in range(6):
        options = TrainOptions(epochs=3, batch_size=32, lr_grid=(30.0,), select_epochs=1, seed=seed)
        torch.manual_seed(seed)
        model = Scaled()
        outcome = fit_choosing_lr(model, _groups(model), train, val, options, False)
        assert evaluate(model, val)[0] == outcome.val_accuracy
        assert outcome.val_accuracy >= outcome.lr_trials["30"] - 1e-6
        if outcome.from_trial:
            assert outcome.best_epoch <= 1
            return
    pytest.skip("no seed made the trial beat the full run")


def test_a_given_lr_skips_the_trials() -> None:
    train, val = _data(64, 0), _data(32, 1)
    model = Scaled()
    outcome = fit_choosing_lr(model, _groups(model), train, val, TrainOptions(epochs=1, lr=0.05), False)
    assert outcome.lr == 0.05 and outcome.lr_trials == {}


def test_a_trained_parameter_outside_the_model_is_refused() -> None:
    """Model selection restores the model's own parameters only: one trained beside them (a module not
    registered on the model) would keep its last value at the best epoch, so fit refuses it."""
    train, val = _data(64, 0), _data(32, 1)
    model = Scaled()
    loose = nn.Parameter(torch.ones(8))
    groups: list[dict[str, object]] = [
        {"params": [model.gain, loose], "lr": 0.05},
        {"params": list(model.head.parameters())},
    ]
    with pytest.raises(ValueError, match="1 of the 4 trained parameters are not parameters of the model"):
        fit(model, groups, train, val, TrainOptions(epochs=1, lr=0.05), False)
    frozen = Scaled()
    frozen.gain.requires_grad_(False)
    with pytest.raises(ValueError, match="not parameters of the model with requires_grad"):
        fit(frozen, _groups(frozen)(0.05), train, val, TrainOptions(epochs=1, lr=0.05), False)
