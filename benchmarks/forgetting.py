"""Zero forgetting on one server-side registry, shown rather than assumed.

Usage: python -m benchmarks.forgetting [--max-train N] [--epochs E] [--write docs/results.md] [--json]

The text tasks are trained one after another against the same resident bank and registered in one
`server.tasks.registry.TaskRegistry`, each with the artifact parts PARTS gives it in turn (the paper's
coefficients alone, plus the FFN scale and shift, plus the attention-pooling head); after each
registration every earlier task's logits on its own test texts (through the server's `Predictor`, the same
routing as when first recorded) and its stored bytes are compared bit for bit with what they were right
after that task was trained.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.sections import replace_section
from kernels import Kernels
from recast_core.backbone import load_text_backbone
from recast_core.config import minilm_config
from recast_core.datasets import load_splits
from recast_core.mimicry import mimic
from recast_core.task_model import artifact_spec
from recast_core.training import TrainOptions, train_task
from server.serving.predictor import Predictor, TaskRequest
from server.stores.directory import DirectoryStore
from server.tasks.catalog import TaskCatalog
from server.tasks.registry import TaskRegistry

TASKS = ("trec", "sms_spam", "movie_reviews", "tweet_sentiment")
# (capacity, pooling) of the i-th task, cycled: every kind of artifact part shares the one registry
PARTS = (("coefficients", "mean"), ("ffn_edit", "mean"), ("ffn_edit", "query"), ("coefficients", "query"))


def run(
    tasks: tuple[str, ...] = TASKS,
    max_train: int = 1000,
    epochs: int = 2,
    max_length: int = 64,
    probe: int = 128,
    lr: float | None = None,
    parts: tuple[tuple[str, str], ...] = PARTS,
) -> dict[str, Any]:
    backbone = load_text_backbone()
    bank = mimic(backbone.model, minilm_config(), "svd", progress=False).bank
    registry = TaskRegistry(artifact_spec(bank, backbone.hidden_size))
    catalog = TaskCatalog(DirectoryStore(Path(tempfile.mkdtemp(prefix="recast-forgetting-"))), registry)
    predictor = Predictor(backbone, bank, Kernels("cpu"), max_length=max_length)
    recorded: dict[str, tuple[list[str], torch.Tensor, bytes]] = {}
    checks: list[dict[str, Any]] = []
    options = TrainOptions(epochs=epochs, max_length=max_length, max_train_examples=max_train, seed=0, lr=lr)
    part_of = {task: parts[i % len(parts)] for i, task in enumerate(tasks)}
    for task in tqdm(tasks, desc="sequential tasks", unit="task"):
        splits = load_splits(task)
        capacity, pooling = part_of[task]
        own = replace(options, capacity=capacity, pooling=pooling)
        result = train_task(backbone, bank, splits.train, val=splits.val, options=own, progress=False)
        data = result.artifact.to_bytes()
        entry = catalog.upload(task, data)
        texts = list(splits.test.texts[:probe])
        recorded[task] = (texts, predictor.logits([TaskRequest(entry, registry.head(entry), texts)])[0], data)
        for earlier, (probe_texts, before, stored) in recorded.items():
            current = registry.get(earlier)
            after = predictor.logits([TaskRequest(current, registry.head(current), probe_texts)])[0]
            checks.append(
                {
                    "after_training": task,
                    "task": earlier,
                    "texts": len(probe_texts),
                    "logits_identical": bool(torch.equal(before, after)),
                    "artifact_identical": getattr(catalog.store.get(earlier), "data", None) == stored,
                    "max_abs_diff": float((after - before).abs().max()),
                }
            )
    # every task in one mixed batch against each task alone (different batch shapes: close, not bitwise)
    requests = [TaskRequest(*registry.resolve(task), recorded[task][0]) for task in tasks]
    mixed = predictor.logits(requests)
    mixed_diff = max(float((m - recorded[t][1]).abs().max()) for m, t in zip(mixed, tasks, strict=True))
    return {
        "tasks": list(tasks),
        "parts": {task: {"capacity": c, "pooling": p} for task, (c, p) in part_of.items()},
        "budget": {"max_train": max_train, "epochs": epochs, "max_length": max_length, "probe": probe},
        "checks": checks,
        "all_identical": all(c["logits_identical"] and c["artifact_identical"] for c in checks),
        "mixed_batch_max_abs_diff": mixed_diff,
        "kernel_path": predictor.kernels.path.value,
    }


def parts_text(result: dict[str, Any]) -> str:
    """The tasks with their artifact parts, e.g. "trec (coefficients), sms_spam (coefficients + FFN edit)"."""
    named = []
    for task in result["tasks"]:
        part = result["parts"][task]
        extras = [" + FFN edit"] * (part["capacity"] == "ffn_edit") + [" + query pool"] * (
            part["pooling"] == "query"
        )
        named.append(f"{task} (coefficients{''.join(extras)})")
    return ", ".join(named)


def table(result: dict[str, Any]) -> str:
    lines = [
        "| after training | earlier task | texts | logits bit-identical | artifact bit-identical "
        "| max abs diff |",
        "|---|---|---:|:---:|:---:|---:|",
    ]
    for c in result["checks"]:
        if c["after_training"] == c["task"]:
            continue
        lines.append(
            f"| {c['after_training']} | {c['task']} | {c['texts']} "
            f"| {'yes' if c['logits_identical'] else 'NO'} "
            f"| {'yes' if c['artifact_identical'] else 'NO'} | {c['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", type=Path, help="replace the forgetting section of this markdown file")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--max-train", type=int, default=1000, help="training examples per task at most")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, help="coefficient learning rate (default: chosen on validation)")
    args = parser.parse_args()
    result = run(max_train=args.max_train, epochs=args.epochs, lr=args.lr)
    b = result["budget"]
    body = (
        "## Zero forgetting on one registry\n\n"
        f"Command: `python -m benchmarks.forgetting --max-train {b['max_train']} --epochs {b['epochs']} "
        "--write docs/results.md`. "
        f"Tasks {parts_text(result)} trained one after another ({b['max_train']} examples, "
        f"{b['epochs']} epochs, {b['max_length']} tokens) and registered in one `TaskRegistry`; after each, "
        f"every earlier task's logits on {b['probe']} of its test texts are compared with those recorded "
        f"right after it was trained (kernel path {result['kernel_path']}). "
        f"All bit-identical: **{'yes' if result['all_identical'] else 'NO'}**. "
        f"Every task in one mixed batch vs. each alone: max abs logit difference "
        f"{result['mixed_batch_max_abs_diff']:.1e} (different batch shapes: equal up to float rounding).\n\n"
        + table(result)
    )
    print(body)
    if args.write:
        replace_section(args.write, "forgetting", body)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
