"""Accuracy per stored byte: RECAST against a linear probe, LoRA r=8 and full fine-tuning on real tasks.

Usage:
    python -m benchmarks.accuracy                     # the full table into docs/ (resumes finished runs)
    python -m benchmarks.accuracy --quick --out DIR   # a few minutes: small budget, one seed

Same backbone (MiniLM), same fixed splits, same token budget (examples x epochs x max length) and model
selection on the validation split for every method. Each finished run is appended to results.json at once,
so an interrupted table resumes where it stopped, and the same command started in several processes (each
with its share of the cores, e.g. OMP_NUM_THREADS=1) divides the runs between them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.baselines import mean_std, run_baseline
from benchmarks.run_ledger import Ledger
from benchmarks.sections import replace_section
from benchmarks.vision import VISION_TASKS, run_vision
from recast_core.backbone import TextBackbone, load_text_backbone
from recast_core.bank import TemplateBank, load_bank
from recast_core.config import minilm_config
from recast_core.data import LabelledTexts, stratified_cap
from recast_core.datasets import load_splits
from recast_core.errors import BankError
from recast_core.mimicry import mimic
from recast_core.training import TrainOptions, prepare_splits, train_task

TEXT_TASKS = ("sms_spam", "trec", "movie_reviews", "tweet_sentiment")
TASKS = TEXT_TASKS + VISION_TASKS
METHODS = (
    "linear_probe",
    "recast",
    "recast_compressed",
    "recast_wide",
    "recast_ffn",
    "recast_pool",
    "recast_ffn_pool",
    "lora_r8",
    "full_ft",
)
# recast: the paper's method on the default bank (the reference row); recast_compressed: fewer templates
# than layers in the one group; recast_wide (gap-closing extension): one group spanning all 6 layers with
# 6 templates, so every layer mixes every layer's template (6 coefficients per module instead of 2);
# recast_ffn: the default bank's coefficients plus a per-channel scale and shift of every FFN output;
# recast_pool: the coefficients with attention pooling by one learned query; recast_ffn_pool: both.
BANKS = {
    "recast": minilm_config(),
    "recast_compressed": minilm_config(groups=1, templates=3),
    "recast_wide": minilm_config(groups=1, templates=6),
}
EXTENDED = ("recast_ffn", "recast_pool", "recast_ffn_pool")  # on the default bank
BANK_OF = {name: name for name in BANKS} | dict.fromkeys(EXTENDED, "recast")  # method -> its bank
CAPACITY_OF = {"recast_ffn": "ffn_edit", "recast_ffn_pool": "ffn_edit"}  # else the coefficients alone
POOLING_OF = {"recast_pool": "query", "recast_ffn_pool": "query"}  # else the mean pool


@dataclass(frozen=True)
class Budget:
    max_train: int
    max_eval: int | None
    epochs: int
    max_length: int
    seeds: tuple[int, ...]
    pretrain: tuple[int, int | None]  # vision backbones: (epochs, examples) on Fashion-MNIST 0-4
    select_epochs: int = TrainOptions.select_epochs  # epochs of each learning-rate trial


# the full budget is the training recipe's defaults (8 epochs, learning rates chosen on validation)
FULL = Budget(
    max_train=1000,
    max_eval=None,
    epochs=TrainOptions.epochs,
    max_length=64,
    seeds=(0, 1, 2),
    pretrain=(3, None),
)
QUICK = Budget(
    max_train=64, max_eval=96, epochs=1, max_length=32, seeds=(0,), pretrain=(1, 1000), select_epochs=1
)


def _bank(name: str, backbone: TextBackbone, cache: Path) -> TemplateBank:
    directory = cache / f"accuracy-{name}"
    try:
        return load_bank(directory)
    except BankError:
        bank = mimic(backbone.model, BANKS[name], "svd", progress=False).bank
        bank.save(directory)
        return bank


def _cap(data: LabelledTexts, cap: int | None) -> LabelledTexts:
    return data if cap is None or len(data) <= cap else data.subset(stratified_cap(data.labels, cap, 0))


def run_one(
    task: str,
    method: str,
    seed: int,
    backbone: TextBackbone,
    banks: dict[str, TemplateBank],
    budget: Budget,
    cache: Path,
) -> dict[str, Any]:
    if task in VISION_TASKS:
        return run_vision(
            method,
            task,
            seed,
            budget.max_train,
            budget.epochs,
            cache,
            banks,
            budget.pretrain,
            budget.max_eval,
        )
    splits = load_splits(task)
    options = TrainOptions(
        epochs=budget.epochs,
        max_length=budget.max_length,
        max_train_examples=budget.max_train,
        seed=seed,
        select_epochs=budget.select_epochs,
        capacity=CAPACITY_OF.get(method, "coefficients"),
        pooling=POOLING_OF.get(method, "mean"),
    )  # every method's learning rate is chosen on validation (TrainOptions.lr None)
    val, test = _cap(splits.val, budget.max_eval), _cap(splits.test, budget.max_eval)
    start = time.perf_counter()
    if method in BANK_OF:
        bank = banks[BANK_OF[method]]
        result = train_task(backbone, bank, splits.train, val=val, test=test, options=options, progress=False)
        art = result.artifact
        row = {
            "test_accuracy": art.training["test_accuracy"],
            "val_accuracy": art.training["val_accuracy"],
            "trainable_params": art.coefficients.numel() * bank.config.coeff_sets + art.extra_parameters,
            "stored_params": art.trainable_parameters,
            "head_params": art.head_parameters,
            "artifact_bytes": len(art.to_bytes()),
            "lr": art.training["lr"],  # the learning rate chosen on validation
        }
    else:
        train, val, labels = prepare_splits(splits.train, val, test, options)
        run = run_baseline(method, backbone, labels, train, val, test, options, options.lr, progress=False)
        row = {
            "test_accuracy": run.test_accuracy,
            "val_accuracy": run.val_accuracy,
            "trainable_params": run.trainable_params,
            "stored_params": run.trainable_params,
            "head_params": run.head_params,
            "artifact_bytes": run.artifact_bytes,
            "lr": None if run.outcome is None else run.outcome.lr,
        }
    return {
        "task": task,
        "method": method,
        "seed": seed,
        **row,
        "train_seconds": round(time.perf_counter() - start, 2),
    }


def _planned(
    tasks: tuple[str, ...], methods: tuple[str, ...], budget: Budget
) -> Iterator[tuple[str, str, int]]:
    for seed in budget.seeds:  # seed-major: an interrupted run still covers every task
        for task in tasks:
            for method in methods:
                if task in VISION_TASKS and method in POOLING_OF:
                    continue  # the vision backbones pool by their class token or the feature map's mean
                yield task, method, seed


def render(runs: list[dict[str, Any]], out: Path) -> str:
    """The results table (mean ± std per task and method, parameters, bytes) and the accuracy plot."""
    tasks = sorted({r["task"] for r in runs}, key=lambda t: TASKS.index(t) if t in TASKS else 99)
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    cell: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        cell.setdefault((r["task"], r["method"]), []).append(100 * r["test_accuracy"])
    lines = [
        "| method | " + " | ".join(tasks) + " | text mean | vision mean | trainable params (MiniLM) | "
        "stored bytes per task (MiniLM) |",
        "|---|" + "---:|" * (len(tasks) + 4),
    ]
    for m in methods:
        cells = []
        means: dict[str, list[float]] = {"text": [], "vision": []}
        for t in tasks:
            values = cell.get((t, m), [])
            if values:
                mu, sd = mean_std(values)
                means["vision" if t in VISION_TASKS else "text"].append(mu)
                cells.append(f"{mu:.2f} ± {sd:.2f} (n={len(values)})")
            else:
                cells.append("—")
        for group, members in (("text", TEXT_TASKS), ("vision", VISION_TASKS)):
            complete = means[group] and len(means[group]) == sum(t in members for t in tasks)
            cells.append(f"{sum(means[group]) / len(means[group]):.2f}" if complete else "—")
        rows_m = [r for r in runs if r["method"] == m and r["task"] in TEXT_TASKS]
        if rows_m:
            params = max(r["trainable_params"] for r in rows_m)
            size = sorted(r["artifact_bytes"] for r in rows_m)[len(rows_m) // 2]
            cells += [f"{params:,}", f"{size:,}"]
        else:
            cells += ["—", "—"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    _plot(runs, methods, out / "results.png")
    gaps = [headline(runs, m) for m in ("recast", "recast_wide", *EXTENDED) if m in methods]
    return "\n".join(lines) + "\n\n" + "\n".join(g for g in gaps if g)


def _params(runs: list[dict[str, Any]], task: str, method: str) -> int:
    return max(r["trainable_params"] for r in runs if r["task"] == task and r["method"] == method)


def headline(runs: list[dict[str, Any]], method: str = "recast") -> str:
    """Mean gaps (points) of `method` to LoRA r=8 and to the linear probe, and its parameter ratio to LoRA."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        acc.setdefault((r["task"], r["method"]), []).append(100 * r["test_accuracy"])
    lines = []
    for label, tasks in (("text tasks", TEXT_TASKS), ("vision tasks", VISION_TASKS)):
        done = [t for t in tasks if all((t, m) in acc for m in (method, "lora_r8", "linear_probe"))]
        if not done:
            continue
        mean = {k: sum(v) / len(v) for k, v in acc.items()}
        gap_lora = sum(mean[(t, method)] - mean[(t, "lora_r8")] for t in done) / len(done)
        gap_probe = sum(mean[(t, method)] - mean[(t, "linear_probe")] for t in done) / len(done)
        ratio = sum(_params(runs, t, method) / _params(runs, t, "lora_r8") for t in done) / len(done)
        lines.append(
            f"- {label} ({len(done)}): {method} vs lora_r8 {gap_lora:+.2f} points, vs linear_probe "
            f"{gap_probe:+.2f} points, {100 * ratio:.3f} % of LoRA's trainable parameters (heads excluded)"
        )
    return "\n".join(lines)


def _plot(runs: list[dict[str, Any]], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        rows = [r for r in runs if r["method"] == m and r["task"] in TEXT_TASKS]  # MiniLM's bytes only
        if not rows:
            continue
        size = sorted(r["artifact_bytes"] for r in rows)[len(rows) // 2]
        accuracy = sum(100 * r["test_accuracy"] for r in rows) / len(rows)
        ax.scatter([size], [accuracy], s=60, label=m)
        ax.annotate(m, (size, accuracy), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes stored per task (median)")
    ax.set_ylabel("test accuracy, mean over text runs (%)")
    ax.set_title("Accuracy vs per-task bytes (MiniLM)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny budget and one seed (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where results.json/.md/.png go")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--cache", type=Path, default=Path(".cache/banks"))
    args = parser.parse_args()
    budget = QUICK if args.quick else FULL
    ledger = Ledger(args.out, budget.__dict__)
    done = {(r["task"], r["method"], r["seed"]) for r in ledger.runs()}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = load_text_backbone()
    wanted = {BANK_OF[m] for m in args.methods if m in BANK_OF}
    banks = {name: _bank(name, backbone, args.cache) for name in BANKS if name in wanted}
    from tqdm.auto import tqdm

    plan = [p for p in _planned(tuple(args.tasks), tuple(args.methods), budget) if p not in done]
    for task, method, seed in tqdm(plan, desc="accuracy table", unit="run"):
        if not ledger.claim((task, method, seed)):
            continue  # finished or under way in another process of the same table
        try:
            row = run_one(task, method, seed, backbone, banks, budget, args.cache)
        except BaseException:
            ledger.release((task, method, seed))
            raise
        ledger.record((task, method, seed), row)
        tqdm.write(json.dumps(row))
    runs = ledger.runs()
    print(write_report(runs, args.out, budget, args.quick))


def write_report(runs: list[dict[str, Any]], out: Path, budget: Budget, quick: bool = False) -> str:
    """The table, its headline gaps and the plot into `out`/results.md and results.png; returns the table."""
    table = render(runs, out)
    where = "" if out == Path("docs") else f" --out {out}"
    header = (
        f"Command: `python -m benchmarks.accuracy{' --quick' if quick else ''}{where}`. "
        f"Budget: {budget.max_train} training examples per task at most, {budget.epochs} epochs, "
        f"{budget.max_length} tokens, seeds {list(budget.seeds)}; model selection on validation; "
        "test accuracy in %, mean ± std over seeds. Trainable parameters exclude the classifier head; "
        "`train_seconds` in results.json is wall time on a shared 2-core machine (some runs shared it "
        "with other jobs), not a speed benchmark.\n\n"
        "![accuracy vs bytes](results.png)\n\n"
    )
    results_md = out / "results.md"
    if not results_md.exists():
        results_md.write_text("# Accuracy per stored byte\n")
    replace_section(results_md, "accuracy", header + table)
    return table


if __name__ == "__main__":
    main()
