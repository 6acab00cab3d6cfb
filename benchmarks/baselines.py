"""Baselines on the same backbone, splits and token budget as RECAST: linear probe, LoRA r=8, full FT."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from recast_core.artifact import serialize
from recast_core.backbone import SentenceEncoder, TextBackbone
from recast_core.data import LabelledTexts
from recast_core.fitting import (
    FitOutcome,
    evaluate,
    fit_choosing_lr,
    probe_head,
    text_examples,
)
from recast_core.train_options import TrainOptions

# the modules RECAST reparameterizes, named for PEFT
# the learning rates each baseline's trials choose from on validation (around the usual values: LoRA
# 1e-3 to 3e-4 with AdamW, full fine-tuning of a BERT-size encoder 2e-5 to 1e-4)
LR_GRIDS = {"lora_r8": (3e-4, 1e-3, 3e-3), "full_ft": (1e-5, 3e-5, 1e-4)}
LORA_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


class EncoderClassifier(nn.Module):
    def __init__(self, encoder_model: nn.Module, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = SentenceEncoder(encoder_model)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask))


@dataclass(frozen=True)
class BaselineRun:
    val_accuracy: float
    test_accuracy: float
    trainable_params: int
    head_params: int
    artifact_bytes: int
    outcome: FitOutcome | None


def _targets(labels: list[str], data: LabelledTexts) -> torch.Tensor:
    index = {label: i for i, label in enumerate(labels)}
    return torch.tensor([index[y] for y in data.labels])


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Size of the tensors as one float32 safetensors file: what a method stores per task."""
    return len(serialize({k: v.detach().float().contiguous() for k, v in tensors.items()}, {}))


def run_baseline(
    method: str,
    backbone: TextBackbone,
    labels: list[str],
    train: LabelledTexts,
    val: LabelledTexts,
    test: LabelledTexts,
    options: TrainOptions,
    lr: float | None,
    progress: bool,
) -> BaselineRun:
    """One baseline; with lr None its learning rate is chosen on validation from LR_GRIDS[method], the
    same short trials as RECAST's coefficients get (recast_core.fitting.fit_choosing_lr)."""
    torch.manual_seed(options.seed)
    splits = {"train": train, "val": val, "test": test}
    y = {name: _targets(labels, split) for name, split in splits.items()}
    examples = {
        name: text_examples(backbone.tokenize, split.texts, y[name], options.max_length)
        for name, split in splits.items()
    }
    model_copy = copy.deepcopy(backbone.model)
    classifier = EncoderClassifier(model_copy, backbone.hidden_size, len(labels))
    embeds = {
        name: backbone.embed(split.texts, max_length=options.max_length)
        for name, split in (("train", train), ("val", val))
    }
    probe_head(classifier.head, embeds["train"], y["train"], embeds["val"], y["val"], options.seed)
    head_params = sum(p.numel() for p in classifier.head.parameters())
    head_state = {f"head.{k}": v for k, v in classifier.head.state_dict().items()}
    if method == "linear_probe":
        for p in model_copy.parameters():
            p.requires_grad_(False)
        classifier.eval()
        return BaselineRun(
            val_accuracy=evaluate(classifier, examples["val"])[0],
            test_accuracy=evaluate(classifier, examples["test"])[0],
            trainable_params=0,
            head_params=head_params,
            artifact_bytes=stored_bytes(head_state),
            outcome=None,
        )
    if method == "lora_r8":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
        classifier.encoder.model = get_peft_model(model_copy, config)
        body = [p for p in classifier.encoder.parameters() if p.requires_grad]
    elif method == "full_ft":
        for p in model_copy.parameters():
            p.requires_grad_(True)
        body = list(model_copy.parameters())
    else:
        raise ValueError(f"unknown baseline {method!r}")
    classifier.eval()  # no dropout, as for RECAST: the same deterministic forward for every method

    def groups(rate: float) -> list[dict[str, object]]:
        return [
            {"params": body, "lr": rate},
            {"params": list(classifier.head.parameters()), "lr": options.head_lr},
        ]

    chosen = replace(options, lr=lr, lr_grid=LR_GRIDS[method])
    outcome = fit_choosing_lr(classifier, groups, examples["train"], examples["val"], chosen, progress)
    trainable = sum(p.numel() for p in body)
    stored = {f"body.{i}": p for i, p in enumerate(body)} | head_state
    return BaselineRun(
        val_accuracy=outcome.val_accuracy,
        test_accuracy=evaluate(classifier, examples["test"])[0],
        trainable_params=trainable,
        head_params=head_params,
        artifact_bytes=stored_bytes(stored),
        outcome=outcome,
    )


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
