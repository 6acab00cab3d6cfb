"""The vision rows of the accuracy table: a small ViT (fused qkv) and a ResNet-style CNN, pretrained here on
Fashion-MNIST classes 0-4 (cached), then adapted to other image tasks by every method.

Task names are `TASK@BACKBONE`, e.g. `fashion_5_9@vit` or `digits@resnet`.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.baselines import stored_bytes
from recast_core.artifact import TaskArtifact
from recast_core.bank import TemplateBank
from recast_core.config import RecastConfig
from recast_core.data import stratified_cap
from recast_core.ffn_edit import FfnEdit
from recast_core.fitting import (
    FitOutcome,
    evaluate,
    fit,
    fit_choosing_lr,
    probe_head,
    tensor_examples,
)
from recast_core.image_data import ImageSet, ImageSplits, digits_splits, fashion_splits
from recast_core.mimicry import mimic
from recast_core.reparam import reparameterize
from recast_core.train_options import TrainOptions
from recast_core.vision import TinyResNet, TinyViT, resnet_config, vit_config

BACKBONES: dict[str, tuple[Callable[..., TinyViT | TinyResNet], Callable[..., RecastConfig], list[str]]] = {
    "vit": (TinyViT, vit_config, ["qkv", "proj", "fc1", "fc2"]),
    "resnet": (TinyResNet, resnet_config, ["conv1", "conv2"]),
}
# recast_ffn: the kind whose outputs are scaled and shifted per channel (the block's last module)
EDITED_KINDS = {"vit": "ffn_out", "resnet": "conv2"}
TASKS: dict[str, Callable[[], ImageSplits]] = {
    "fashion_5_9": lambda: fashion_splits(range(5, 10)),
    "digits": digits_splits,
}
VISION_TASKS = tuple(f"{task}@{backbone}" for backbone in BACKBONES for task in TASKS)
# the learning rates each method's trials choose from on validation (RECAST: the training default grid)
LR_GRIDS = {"lora_r8": (3e-4, 1e-3, 3e-3), "full_ft": (1e-4, 3e-4, 1e-3)}
# (groups, templates per group) of each RECAST bank on the 4-block backbones
BANK_SHAPES = {"recast": (2, 2), "recast_compressed": (1, 2), "recast_wide": (1, 4), "recast_ffn": (2, 2)}
BANK_OF = {"recast_ffn": "recast"}  # methods that train on another method's bank


Backbone = TinyViT | TinyResNet


class FeatureClassifier(nn.Module):
    def __init__(self, backbone: Backbone, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.head.in_features, num_labels)
        self.edit: FfnEdit | None = None  # recast_ffn: registered here so that its state is the model's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.features(x))


def pretrained(
    name: str, cache: Path, epochs: int = 3, max_examples: int | None = None, progress: bool = True
) -> Backbone:
    """The backbone pretrained on Fashion-MNIST classes 0-4; trained once, then loaded from `cache`."""
    factory = BACKBONES[name][0]
    torch.manual_seed(0)
    model: Backbone = factory(num_classes=5)
    path = cache / f"{name}-fashion0-4-e{epochs}-n{max_examples or 'all'}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    splits = fashion_splits(range(5))
    if max_examples is not None:
        labels = [str(int(t)) for t in splits.train.targets]
        splits = ImageSplits(
            splits.train.subset(stratified_cap(labels, max_examples, 0)), splits.val, splits.test
        )
    model.train()
    examples = tensor_examples(splits.train.images, splits.train.targets)
    val = tensor_examples(splits.val.images, splits.val.targets)
    options = TrainOptions(
        epochs=epochs, batch_size=128, lr=1e-3, head_lr=1e-3, weight_decay=1e-4, patience=epochs
    )
    fit(model, [{"params": list(model.parameters()), "lr": 1e-3}], examples, val, options, progress)
    model.eval()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


def _cap(images: ImageSet, cap: int | None, seed: int) -> ImageSet:
    if cap is None or len(images) <= cap:
        return images
    return images.subset(stratified_cap([str(int(t)) for t in images.targets], cap, seed))


def _features(model: Backbone, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.features(images[i : i + 512]) for i in range(0, len(images), 512)])


def run_vision(
    method: str,
    task: str,
    seed: int,
    max_train: int,
    epochs: int,
    cache: Path,
    banks: dict[str, TemplateBank],
    pretrain: tuple[int, int | None] = (3, None),
    max_eval: int | None = None,
) -> dict[str, Any]:
    """One (task, method, seed) row; `pretrain` is (epochs, examples) of the cached backbone pretraining,
    `max_eval` caps the validation and test splits (stratified; for smoke tests)."""
    task_name, backbone_name = task.split("@")
    _, make_config, lora_targets = BACKBONES[backbone_name]
    base = pretrained(backbone_name, cache, *pretrain, progress=False)
    key = f"{backbone_name}-{BANK_OF.get(method, method)}"
    if method in BANK_SHAPES and key not in banks:
        num_groups, num_templates = BANK_SHAPES[method]
        config = make_config(groups=num_groups, templates=num_templates)
        banks[key] = mimic(base, config, "svd", progress=False).bank
    full = TASKS[task_name]()
    splits = ImageSplits(
        _cap(full.train, max_train, seed), _cap(full.val, max_eval, 0), _cap(full.test, max_eval, 0)
    )
    train = splits.train
    options = TrainOptions(epochs=epochs, batch_size=64, seed=seed)
    if method in LR_GRIDS:
        options = replace(options, lr_grid=LR_GRIDS[method])
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    classifier = FeatureClassifier(model, len(train.classes))
    train_x, val_x = _features(model, train.images), _features(model, splits.val.images)
    probe_head(classifier.head, train_x, train.targets, val_x, splits.val.targets, seed)
    ex = {
        name: tensor_examples(s.images, s.targets)
        for name, s in (("train", train), ("val", splits.val), ("test", splits.test))
    }
    head = {"head.weight": classifier.head.weight, "head.bias": classifier.head.bias}
    head_params = sum(p.numel() for p in classifier.head.parameters())
    body: list[nn.Parameter] = []
    edit: FfnEdit | None = None
    outcome: FitOutcome | None = None
    size = stored_bytes(head)
    if method in BANK_SHAPES:
        reparam = reparameterize(model, banks[key])
        body = list(reparam.coefficients)
        if method == "recast_ffn":
            edit = FfnEdit(model, reparam.plan, EDITED_KINDS[backbone_name])
            classifier.edit = edit  # the classifier's own: model selection snapshots and restores it
            body += list(edit.parameters())
    elif method == "lora_r8":
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets), model)
        body = [p for n, p in model.named_parameters() if "lora_" in n]
    elif method == "full_ft":
        body = list(model.parameters())
    elif method != "linear_probe":
        raise ValueError(f"unknown method {method!r}")
    for p in body:
        p.requires_grad_(True)
    classifier.eval()  # frozen BatchNorm statistics and no dropout for every method
    if body:

        def groups(rate: float) -> list[dict[str, object]]:
            return [
                {"params": body, "lr": rate},
                {"params": list(classifier.head.parameters()), "lr": options.head_lr},
            ]

        outcome = fit_choosing_lr(classifier, groups, ex["train"], ex["val"], options, progress=False)
    if method.startswith("recast"):
        artifact = TaskArtifact(
            coefficients=reparam.collapsed().float(),
            head_weight=classifier.head.weight.detach().clone(),
            head_bias=classifier.head.bias.detach().clone(),
            labels=train.classes,
            bank_fingerprint=banks[key].fingerprint,
            ffn_scale=None if edit is None else edit.values()[0],
            ffn_shift=None if edit is None else edit.values()[1],
        )
        size = len(artifact.to_bytes())
    elif body:
        size = stored_bytes({f"body.{i}": p for i, p in enumerate(body)} | head)
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "test_accuracy": evaluate(classifier, ex["test"])[0],
        "val_accuracy": outcome.val_accuracy if outcome else evaluate(classifier, ex["val"])[0],
        "trainable_params": sum(p.numel() for p in body),
        "stored_params": sum(p.numel() for p in body)
        if not method.startswith("recast")
        else artifact.trainable_parameters,
        "head_params": head_params,
        "artifact_bytes": size,
        "lr": outcome.lr if outcome else None,  # the learning rate chosen on validation
        "train_seconds": round(time.perf_counter() - start, 2),
    }
