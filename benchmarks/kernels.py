"""Throughput of one MiniLM forward when every sequence belongs to a different task, side by side.

Usage:
    python -m benchmarks.kernels [--batches 8 32 128] [--natural 16 64] [--dtype float32|bfloat16]
                                 [--rounds 15] [--json] [--write docs/benchmarks.md]
    python -m benchmarks.kernels --device cuda          # on a GPU host: the Triton path

All methods run in one process, interleaved round by round (the machine is noisy), in one dtype. Two
kinds of batch: `--batches` of sequences of 64 tokens, and `--natural` batches of real texts (the test
splits of the bundled tasks, mixed) padded to the batch's longest, as the server pads. Ratios are
sequences/s relative to the plain backbone, paired round by round (the median of the per-round ratios):
    plain       the original MiniLM (one weight for everybody)
    hetero      this project's path, every sequence a different task (MultiTaskEncoder)
    hetero_edit the same with each task's per-channel scale and shift of every FFN output (RED) on
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
from kernels import Kernels, compose, cpu_features
from recast_core.backbone import SentenceEncoder, TextBackbone, load_text_backbone, sample_sentences
from recast_core.bank import TemplateBank
from recast_core.config import minilm_config
from recast_core.datasets import load_splits
from recast_core.mimicry import mimic
from recast_core.multitask import MultiTaskEncoder
from recast_core.reparam import reparameterize

LORA_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
SEQUENCE_LENGTH = 64
NATURAL_MAX_LENGTH = 128  # the server's default max_length
NATURAL_TASKS = ("trec", "sms_spam", "tweet_sentiment", "movie_reviews")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Forward = Callable[[], Any]


def _tokens(backbone: TextBackbone, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    sentences = sample_sentences()
    texts = [sentences[i % len(sentences)] for i in range(batch)]
    enc = backbone.tokenizer(
        texts, padding="max_length", truncation=True, max_length=SEQUENCE_LENGTH, return_tensors="pt"
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def natural_texts(seed: int = 0) -> list[str]:
    """The bundled tasks' test texts, mixed in a fixed order."""
    texts = [text for name in NATURAL_TASKS for text in load_splits(name).test.texts]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [texts[i] for i in order]


def _natural_tokens(
    backbone: TextBackbone, batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    texts = natural_texts()[:batch]
    enc = backbone.tokenizer(
        texts, padding="longest", truncation=True, max_length=NATURAL_MAX_LENGTH, return_tensors="pt"
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


METHODS = ("plain", "hetero", "hetero_edit", "homo", "peft_mixed", "peft_single", "naive")


def methods(
    backbone: TextBackbone,
    bank: TemplateBank,
    tokens: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    kernels: Kernels,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Forward]:
    ids, mask = tokens
    batch = int(ids.shape[0])
    plain = SentenceEncoder(copy.deepcopy(backbone.model).to(device=device, dtype=dtype)).eval()
    encoder = MultiTaskEncoder(backbone, bank, kernels, dtype=dtype)
    table = _task_table(bank, batch).to(device)
    every = torch.arange(batch, device=device)
    same = torch.zeros(batch, dtype=torch.long, device=device)
    keys = [f"task-{i}" for i in range(batch)]
    peft = _peft(backbone, batch, device).to(dtype)
    names = [f"t{i}" for i in range(batch)]
    naive_reparam = reparameterize(copy.deepcopy(backbone.model), bank)
    naive_model = SentenceEncoder(naive_reparam.model.to(device=device, dtype=dtype)).eval()

    gen = torch.Generator().manual_seed(1)
    edit_shape = (batch, encoder.num_edited_layers, encoder.edit_width)
    scale = (1 + 0.1 * torch.randn(edit_shape, generator=gen)).to(device)
    shift = (0.1 * torch.randn(edit_shape, generator=gen)).to(device)

    def run_naive() -> None:
        for b in range(batch):  # the task's full weights are composed inside every forward
            naive_reparam.set_coefficients(table[b].cpu())
            naive_model(ids[b : b + 1], mask[b : b + 1])

    return {
        "plain": lambda: plain(ids, mask),
        "hetero": lambda: encoder(ids, mask, every, table, keys),
        "hetero_edit": lambda: encoder(ids, mask, every, table, keys, ffn_scale=scale, ffn_shift=shift),
        "homo": lambda: encoder(ids, mask, same, table[:1], keys[:1]),
        "peft_mixed": lambda: peft(input_ids=ids, attention_mask=mask, adapter_names=names),
        "peft_single": lambda: peft(input_ids=ids, attention_mask=mask, adapter_names=["t0"] * batch),
        "naive": run_naive,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_rounds(
    forwards: dict[str, Forward], rounds: int, device: torch.device, desc: str
) -> dict[str, list[float]]:
    """Seconds per forward of each method in every round, interleaved round by round after one warm-up
    each (every method runs once per round, back to back)."""
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
    return times


def measure(forwards: dict[str, Forward], rounds: int, device: torch.device, desc: str) -> dict[str, float]:
    """Median seconds per forward of each method, interleaved round by round after one warm-up each."""
    times = measure_rounds(forwards, rounds, device, desc)
    return {name: statistics.median(values) for name, values in times.items()}


def paired_ratios(times: dict[str, list[float]], base: str = "plain") -> dict[str, float]:
    """Each method's throughput relative to `base`, the median over rounds of the ratio within a round.

    A method and the base run seconds apart in the same round, so a slow spell of a shared machine (which
    lasts longer than a round's few forwards) moves both; the ratio of two medians taken over different
    rounds does not cancel it."""
    return {
        name: statistics.median(b / t for b, t in zip(times[base], values, strict=True))
        for name, values in times.items()
        if name != base
    }


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


def run(
    batches: list[int],
    rounds: int,
    device: torch.device,
    natural: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per batch; `only` keeps these methods (plain always runs: it is the base of every ratio)."""
    backbone = load_text_backbone()
    bank = mimic(backbone.model, minilm_config(), "svd", progress=False).bank
    kernels = Kernels(device)
    rows = []
    shapes = [(b, False) for b in batches] + [(b, True) for b in natural or []]
    for batch, is_natural in shapes:
        tokens = (_natural_tokens if is_natural else _tokens)(backbone, batch, device)
        forwards = methods(backbone, bank, tokens, device, kernels, dtype)
        if only:
            forwards = {name: fn for name, fn in forwards.items() if name == "plain" or name in only}
        before = set(kernels.variant_choices().items())
        label = f"{batch} natural" if is_natural else f"batch {batch}"
        times = measure_rounds(forwards, rounds, device, label)
        plain = statistics.median(times["plain"])
        row: dict[str, Any] = {
            "batch": batch,
            "natural": is_natural,
            "tokens": int(tokens[0].shape[1]),
            "real_tokens_mean": round(float(tokens[1].sum(dim=1).float().mean()), 1),
            "dtype": str(dtype).removeprefix("torch."),
            "kernel_path": kernels.path.value,
            "kernel_detail": kernels.detail,
            "variants": sorted({v for k, v in set(kernels.variant_choices().items()) - before}),
            "plain_seq_per_s": round(batch / plain, 1),
        }
        for name, ratio in paired_ratios(times).items():
            row[f"{name}_vs_plain"] = round(ratio, 3)
        row["compose_ms_all_tasks"] = round(1e3 * compose_seconds(bank, batch, device), 2)
        row["compose_ms_one_task"] = round(1e3 * compose_seconds(bank, 1, device), 3)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | plain seq/s | hetero | hetero + FFN scale/shift (vs hetero) | homo | PEFT mixed "
        "| PEFT single | naive | compose all / one task (ms) | hetero variants |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        shape = (
            f"{r['batch']} natural (padded {r['tokens']}, mean {r['real_tokens_mean']})"
            if r.get("natural")
            else f"{r['batch']} x {r['tokens']}"
        )

        def ratio(name: str, r: dict[str, Any] = r) -> str:
            value = r.get(f"{name}_vs_plain")
            return "-" if value is None else f"{value:.3f}"

        edit = ratio("hetero_edit")
        if "hetero_edit_vs_plain" in r and "hetero_vs_plain" in r:
            edit += f" ({r['hetero_edit_vs_plain'] / r['hetero_vs_plain']:.3f})"
        lines.append(
            f"| {shape} | {r['plain_seq_per_s']} | {ratio('hetero')} | {edit} | {ratio('homo')} "
            f"| {ratio('peft_mixed')} | {ratio('peft_single')} | {ratio('naive')} "
            f"| {r['compose_ms_all_tasks']} / {r['compose_ms_one_task']} "
            f"| {', '.join(r.get('variants', [])) or '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="*", default=[32, 8, 128])
    parser.add_argument(
        "--natural", type=int, nargs="*", default=[16, 64], help="batches of real texts padded to the longest"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS[1:], help="run only these beside plain (default: all)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--json", action="store_true", help="last line: one JSON object with the batch-32 ratios"
    )
    parser.add_argument("--write", type=Path, help="replace the kernels section of this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not args.batches and not args.natural:
        parser.error("give at least one of --batches and --natural")
    if args.methods and args.write:
        parser.error("--methods runs part of the table: it is printed, not written over the record")
    dtype = DTYPES[args.dtype]
    rows = run(args.batches, args.rounds, device, args.natural, dtype, args.methods)
    command = " ".join(
        [
            "python -m benchmarks.kernels",
            f"--dtype {args.dtype}",
            f"--rounds {args.rounds}",
            " ".join(["--batches", *map(str, args.batches)]),
            " ".join(["--natural", *map(str, args.natural)]),
            *([" ".join(["--methods", *args.methods])] if args.methods else []),
        ]
    )
    where = cpu_features.describe() if device.type == "cpu" else torch.cuda.get_device_name(device)
    body = (
        f"Command: `{command} --write docs/benchmarks.md` "
        f"({time.strftime('%Y-%m-%d')}, {where}, "
        f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}, device {device}, "
        f"kernel path {rows[0]['kernel_path']} ({rows[0]['kernel_detail']}), {args.dtype}, "
        "every sequence of the "
        f"hetero, PEFT mixed and naive batches a different task, median of {args.rounds} interleaved "
        "rounds). "
        "Ratios are throughput relative to the plain backbone: the median over rounds of the ratio "
        "within each round.\n\n" + table(rows)
    )
    print(body)
    if args.write:
        section = "kernels" if device.type == "cpu" else f"kernels-{device.type}"
        replace_section(args.write, section if dtype == torch.float32 else f"{section}-{args.dtype}", body)
    if args.json:
        main_row = next((r for r in rows if r["batch"] == 32), rows[0])
        print(json.dumps(main_row | {"rows": rows}))


if __name__ == "__main__":
    main()
