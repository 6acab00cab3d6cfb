"""The options of one training run: the one schema the CLI, the HTTP API and the training code share.

Kept free of torch so that the CLI's parser and the server's request models import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from recast_core.errors import ConfigError

__all__ = ["CAPACITIES", "LR_GRID", "POOLINGS", "SCHEDULES", "TrainOptions"]

SCHEDULES = ("constant", "cosine")
# what a task trains beside its head: the paper's per-module coefficients, or those plus a per-channel
# scale and shift of every layer's FFN output (representation editing). ffn_edit is the default: on the
# bundled text tasks it gains about 3 points over the coefficients alone (which fall below the linear probe
# on movie reviews) and beats the probe on every text run, at 4,656 numbers per task on MiniLM (1.4 % of
# LoRA r=8's); the table is in docs/accuracy-next
CAPACITIES = ("coefficients", "ffn_edit")
# how the head pools the last hidden states: their mean, or attention with one learned query per task
POOLINGS = ("mean", "query")
LR_GRID = (1e-2, 3e-2, 1e-1)  # coefficient learning rates tried when none is given


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 8
    batch_size: int = 32
    lr: float | None = None  # the coefficients' learning rate; None: chosen from lr_grid on validation
    # the coefficients' own rate when the task trains an FFN edit or a pooling query beside them (lr is
    # then those parts' rate); None: the coefficients follow lr
    coef_lr: float | None = None
    head_lr: float = 5e-4  # the head starts at the probe's optimum: it moves slowly
    weight_decay: float = 1e-6
    patience: int = 8  # epochs without a better validation score before stopping (8: the whole decay)
    warmup: float = 0.1  # fraction of the steps with a linear learning-rate warm-up
    schedule: str = "cosine"  # or "constant"; cosine decays to 0 over the remaining steps
    lr_grid: tuple[float, ...] = LR_GRID
    select_epochs: int = 2  # epochs of each lr_grid trial
    val_fraction: float = 0.15
    max_length: int = 64
    max_train_examples: int | None = None
    seed: int = 0
    capacity: str = "ffn_edit"
    pooling: str = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_grid", tuple(self.lr_grid))  # JSON gives a list
        problems = [
            f"{name} must be >= {low}, got {getattr(self, name)!r}"
            for name, low in (("epochs", 1), ("batch_size", 1), ("patience", 1), ("max_length", 8))
            if getattr(self, name) < low
        ]
        problems += [
            f"{name} must be > 0, got {getattr(self, name)!r}"
            for name in ("lr", "coef_lr", "head_lr")
            if getattr(self, name) is not None and not getattr(self, name) > 0
        ]
        if self.lr is None and (not self.lr_grid or not all(lr > 0 for lr in self.lr_grid)):
            problems.append(f"lr_grid must hold positive learning rates, got {self.lr_grid!r}")
        if self.select_epochs < 1:
            problems.append(f"select_epochs must be >= 1, got {self.select_epochs!r}")
        if not 0 <= self.warmup < 1:
            problems.append(f"warmup must be in [0, 1), got {self.warmup!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.capacity not in CAPACITIES:
            problems.append(f"capacity must be one of {', '.join(CAPACITIES)}, got {self.capacity!r}")
        if self.pooling not in POOLINGS:
            problems.append(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.max_train_examples is not None and self.max_train_examples < 2:
            problems.append(f"max_train_examples must be >= 2, got {self.max_train_examples!r}")
        if problems:
            raise ConfigError(problems)
