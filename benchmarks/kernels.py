"""Throughput of one MiniLM forward when every sequence belongs to a different task, side by side.

Usage:
    python -m benchmarks.kernels [--batches 8 32 128] [--rounds 15] [--json] [--write docs/benchmarks.md]
    python -m benchmarks.kernels --device cuda          # on a GPU host: the Triton path

All methods run in one process, interleaved round by round (the machine is noisy), fp32, 64 tokens per
sequence; ratios are sequences/s relative to the plain backbone measured in the same rounds:
    plain       the original MiniLM (one weight for everybody)
    hetero      this project's path, every sequence a different task (MultiTaskEncoder)
    homo        this project's path, every sequence the same (hot, cached) task
    peft_mixed  PEFT LoRA r=8 on the same modules, one adapter per sequence (`adapter_names`)
    peft_single PEFT LoRA r=8, one adapter for the whole batch
    naive       compose each request's full weights and run it alone (batch of one per task)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks.sections import replace_section
from kernels import Kernels, compose
from recast_core.backbone import SentenceEncoder, TextBackbone, load_text_backbone, sample_sentences
from recast_core.bank import TemplateBank
from recast_core.config import minilm_config
from recast_core.mimicry import mimic
from recast_core.multitask import MultiTaskEncoder
from recast_core.reparam import reparameterize

LORA_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
SEQUENCE_LENGTH = 64
Forward = Callable[[], Any]


def _tokens(backbone: TextBackbone, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    sentences = sample_sentences()
    texts = [sentences[i % len(sentences)] for i in range(batch)]
    enc = backbone.tokenizer(
        texts, padding="max_length", truncation=True, max_length=SEQUENCE_LENGTH, return_tensors="pt"
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _task_table(bank: TemplateBank, tasks: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = bank.base_coefficients.mean(dim=1)
    return base + 0.05 * torch.randn(tasks, *base.shape, generator=gen)


def _peft(backbone: TextBackbone, adapters: int, device: torch.device) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    model = get_peft_model(copy.deepcopy(backbone.model), config, adapter_name="t0")
    for i in range(1, adapters):
        model.add_adapter(f"t{i}", config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero updates, as trained adapters have
                param.normal_(0.0, 0.01)
    return model.to(device).eval()


def methods(
    backbone: TextBackbone, bank: TemplateBank, batch: int, device: torch.device, kernels: Kernels
) -> dict[str, Forward]:
    ids, mask = _tokens(backbone, batch, device)
    plain = SentenceEncoder(backbone.model.to(device)).eval()
    encoder = MultiTaskEncoder(backbone, bank, kernels).to(device)
    table = _task_table(bank, batch).to(device)
    every = torch.arange(batch, device=device)
    same = torch.zeros(batch, dtype=torch.long, device=device)
    keys = [f"task-{i}" for i in range(batch)]
    peft = _peft(backbone, batch, device)
    names = [f"t{i}" for i in range(batch)]
    naive_reparam = reparameterize(copy.deepcopy(backbone.model), bank)
    naive_model = SentenceEncoder(naive_reparam.model.to(device)).eval()

    def run_naive() -> None:
        for b in range(batch):  # the task's full weights are composed inside every forward
            naive_reparam.set_coefficients(table[b].cpu())
            naive_model(ids[b : b + 1], mask[b : b + 1])

    return {
        "plain": lambda: plain(ids, mask),
        "hetero": lambda: encoder(ids, mask, every, table, keys),
        "homo": lambda: encoder(ids, mask, same, table[:1], keys[:1]),
        "peft_mixed": lambda: peft(input_ids=ids, attention_mask=mask, adapter_names=names),
        "peft_single": lambda: peft(input_ids=ids, attention_mask=mask, adapter_names=["t0"] * batch),
        "naive": run_naive,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(forwards: dict[str, Forward], rounds: int, device: torch.device, desc: str) -> dict[str, float]:
    """Median seconds per forward of each method, interleaved round by round after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.inference_mode():
        for fn in forwards.values():
            fn()
        for _ in tqdm(range(rounds), desc=desc, unit="round", leave=False):
            for name, fn in forwards.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def compose_seconds(bank: TemplateBank, tasks: int, device: torch.device) -> float:
    """Composing every layer's weight for `tasks` tasks at once (the work the fused paths avoid storing)."""
    table = _task_table(bank, tasks).to(device)
    templates = [bank.templates[key].to(device) for key in sorted(bank.templates)]
    with torch.inference_mode():
        samples = []
        for _ in range(5):
            _sync(device)
            start = time.perf_counter()
            for i, t in enumerate(templates):
                compose(t, table[:, i % table.shape[1]])
            _sync(device)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run(batches: list[int], rounds: int, device: torch.device) -> list[dict[str, Any]]:
    backbone = load_text_backbone()
    bank = mimic(backbone.model, minilm_config(), "svd", progress=False).bank
    kernels = Kernels(device)
    rows = []
    for batch in batches:
        seconds = measure(methods(backbone, bank, batch, device, kernels), rounds, device, f"batch {batch}")
        plain = seconds["plain"]
        row: dict[str, Any] = {
            "batch": batch,
            "tokens": SEQUENCE_LENGTH,
            "kernel_path": kernels.path.value,
            "kernel_detail": kernels.detail,
            "plain_seq_per_s": round(batch / plain, 1),
        }
        for name, value in seconds.items():
            if name != "plain":
                row[f"{name}_vs_plain"] = round(plain / value, 3)
        row["compose_ms_all_tasks"] = round(1e3 * compose_seconds(bank, batch, device), 2)
        row["compose_ms_one_task"] = round(1e3 * compose_seconds(bank, 1, device), 3)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | plain seq/s | hetero | homo | PEFT mixed | PEFT single | naive "
        "| compose all / one task (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} x {r['tokens']} | {r['plain_seq_per_s']} | {r['hetero_vs_plain']:.3f} "
            f"| {r['homo_vs_plain']:.3f} | {r['peft_mixed_vs_plain']:.3f} | {r['peft_single_vs_plain']:.3f} "
            f"| {r['naive_vs_plain']:.3f} | {r['compose_ms_all_tasks']} / {r['compose_ms_one_task']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 8, 128])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--json", action="store_true", help="last line: one JSON object with the batch-32 ratios"
    )
    parser.add_argument("--write", type=Path, help="replace the kernels section of this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = run(args.batches, args.rounds, device)
    body = (
        f"Command: `python -m benchmarks.kernels --rounds {args.rounds} --write docs/benchmarks.md` "
        f"({time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}, device {device}, "
        f"kernel path {rows[0]['kernel_path']} ({rows[0]['kernel_detail']}), fp32, every sequence of the "
        f"hetero, PEFT mixed and naive batches a different task, median of {args.rounds} interleaved "
        "rounds). "
        "Ratios are throughput relative to the plain backbone in the same rounds.\n\n" + table(rows)
    )
    print(body)
    if args.write:
        replace_section(args.write, "kernels" if device.type == "cpu" else f"kernels-{device.type}", body)
    if args.json:
        main_row = next((r for r in rows if r["batch"] == 32), rows[0])
        print(json.dumps(main_row | {"rows": rows}))


if __name__ == "__main__":
    main()
