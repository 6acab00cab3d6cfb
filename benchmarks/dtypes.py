"""Serving dtypes compared on real tasks: label agreement with float32 and throughput, side by side.

Usage:
    python -m benchmarks.dtypes [--dtypes bfloat16] [--max-train 1000] [--epochs 3] [--batch 32]
                                [--cache .cache/bench-dtypes] [--write docs/benchmarks.md]

Each bundled text task is trained once with RECAST (cached under --cache, keyed by the bank and the
options). The held-out test texts of every task are then mixed, so every batch holds several tasks, and
served through the multi-task encoder in float32 and in each other dtype, batches padded to the batch's
longest text as the server pads; class scores are computed in float32 from each dtype's embeddings, as
the server computes them. Reported per task: label agreement with float32, the largest difference in a
class probability; overall: texts/s of each dtype, measured interleaved batch by batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.kernels import DTYPES, NATURAL_MAX_LENGTH
from benchmarks.sections import replace_section
from kernels import Kernels, cpu_features
from recast_core.artifact import TaskArtifact, read_artifact
from recast_core.backbone import TextBackbone, load_text_backbone
from recast_core.bank import TemplateBank
from recast_core.config import minilm_config
from recast_core.datasets import load_splits
from recast_core.mimicry import mimic
from recast_core.multitask import MultiTaskEncoder
from recast_core.train_options import TrainOptions
from recast_core.training import train_task

TASKS = ("trec", "sms_spam", "tweet_sentiment", "movie_reviews")
TARGET_AGREEMENT = 0.995


def trained(
    backbone: TextBackbone, bank: TemplateBank, task: str, options: TrainOptions, cache: Path
) -> TaskArtifact:
    key = hashlib.sha256(f"{bank.fingerprint} {task} {options}".encode()).hexdigest()[:16]
    path = cache / f"{task}-{key}.safetensors"
    if path.is_file():
        return read_artifact(path)
    splits = load_splits(task)
    artifact = train_task(backbone, bank, splits.train, val=splits.val, options=options).artifact
    cache.mkdir(parents=True, exist_ok=True)
    artifact.save(path)
    return artifact


def _batches(
    artifacts: dict[str, TaskArtifact], batch: int, seed: int = 0
) -> list[list[tuple[str, str, int]]]:
    """(task, text, gold label index) triples of every test split, shuffled, in batches."""
    rows = []
    for task, artifact in artifacts.items():
        index = {label: i for i, label in enumerate(artifact.labels)}
        test = load_splits(task).test
        rows += [(task, t, index.get(y, -1)) for t, y in zip(test.texts, test.labels, strict=True)]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [rows[i] for i in order]
    return [shuffled[i : i + batch] for i in range(0, len(shuffled), batch)]


def compare(
    backbone: TextBackbone,
    bank: TemplateBank,
    artifacts: dict[str, TaskArtifact],
    dtypes: list[torch.dtype],
    batch: int,
) -> dict[str, Any]:
    kernels = Kernels("cpu")
    names = list(artifacts)
    table = torch.stack([artifacts[t].coefficients.to(torch.float32) for t in names])
    heads = {t: (a.head_weight.float(), a.head_bias.float()) for t, a in artifacts.items()}
    encoders = {dtype: MultiTaskEncoder(backbone, bank, kernels, dtype) for dtype in [torch.float32, *dtypes]}
    seconds = dict.fromkeys(encoders, 0.0)
    probs: dict[torch.dtype, list[torch.Tensor]] = {dtype: [] for dtype in encoders}
    tasks_of_rows: list[str] = []
    gold: list[int] = []
    batches = _batches(artifacts, batch)
    with torch.inference_mode():
        for rows in tqdm(batches, desc="batches", unit="batch"):
            enc = backbone.tokenizer(
                [text for _, text, _ in rows],
                padding="longest",
                truncation=True,
                max_length=NATURAL_MAX_LENGTH,
                return_tensors="pt",
            )
            slots = torch.tensor([names.index(task) for task, _, _ in rows])
            for dtype, encoder in encoders.items():
                start = time.perf_counter()
                embeddings = encoder(enc["input_ids"], enc["attention_mask"], slots, table).float()
                seconds[dtype] += time.perf_counter() - start
                for (task, _, _), row in zip(rows, embeddings, strict=True):
                    weight, bias = heads[task]
                    probs[dtype].append(torch.softmax(weight @ row + bias, dim=-1))
            tasks_of_rows += [task for task, _, _ in rows]
            gold += [label for _, _, label in rows]
    texts = len(tasks_of_rows)
    result: dict[str, Any] = {
        "texts": texts,
        "batches": len(batches),
        "texts_per_s": {str(d).removeprefix("torch."): round(texts / s, 1) for d, s in seconds.items()},
        "variants": sorted(set(kernels.variant_choices().values())),
        "tasks": {},
    }
    reference = probs[torch.float32]
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for task in names:
            rows_of = [i for i, t in enumerate(tasks_of_rows) if t == task]
            agree = sum(int(reference[i].argmax()) == int(probs[dtype][i].argmax()) for i in rows_of)
            diff = max(float((reference[i] - probs[dtype][i]).abs().max()) for i in rows_of)
            acc32 = sum(int(reference[i].argmax()) == gold[i] for i in rows_of) / len(rows_of)
            acc = sum(int(probs[dtype][i].argmax()) == gold[i] for i in rows_of) / len(rows_of)
            result["tasks"].setdefault(task, {"texts": len(rows_of), "float32_accuracy": round(acc32, 4)})
            result["tasks"][task][name] = {
                "agreement": round(agree / len(rows_of), 5),
                "max_probability_difference": round(diff, 5),
                "accuracy": round(acc, 4),
            }
    return result


def report(result: dict[str, Any], dtypes: list[str], command: str) -> str:
    lines = [
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {cpu_features.describe()}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{result['texts']} held-out test texts of {len(result['tasks'])} tasks, mixed, in "
        f"{result['batches']} batches padded to their longest; CPU variants used: "
        f"{', '.join(result['variants']) or '-'}).",
        "",
        "| task | texts | float32 accuracy | "
        + " | ".join(f"{d} agreement | {d} max prob. diff | {d} accuracy" for d in dtypes)
        + " |",
        "|---|---:|---:|" + "---:|---:|---:|" * len(dtypes),
    ]
    for task, row in result["tasks"].items():
        cells = [
            f"{row[d]['agreement'] * 100:.2f} % | {row[d]['max_probability_difference']:.4f} | "
            f"{row[d]['accuracy']:.4f}"
            for d in dtypes
        ]
        lines.append(
            f"| {task} | {row['texts']} | {row['float32_accuracy']:.4f} | " + " | ".join(cells) + " |"
        )
    speeds = result["texts_per_s"]
    base = speeds["float32"]
    lines += [
        "",
        "Throughput, interleaved batch by batch: "
        + ", ".join(f"{d} {v} texts/s ({v / base:.2f} x float32)" for d, v in speeds.items())
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=sorted(set(DTYPES) - {"float32"}), default=["bfloat16"]
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--max-train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(".cache/bench-dtypes"))
    parser.add_argument("--write", type=Path, help="replace the dtypes section of this markdown file")
    parser.add_argument("--json", action="store_true", help="last line: the result as one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_text_backbone()
    bank = mimic(backbone.model, minilm_config(), "svd", progress=False).bank
    options = TrainOptions(epochs=args.epochs, max_train_examples=args.max_train)
    artifacts = {
        task: trained(backbone, bank, task, options, args.cache)
        for task in tqdm(args.tasks, desc="tasks", unit="task")
    }
    result = compare(backbone, bank, artifacts, [DTYPES[d] for d in args.dtypes], args.batch)
    command = (
        f"python -m benchmarks.dtypes --dtypes {' '.join(args.dtypes)} --max-train {args.max_train} "
        f"--epochs {args.epochs} --batch {args.batch} --write docs/benchmarks.md"
    )
    body = report(result, args.dtypes, command)
    print(body)
    if args.write:
        replace_section(args.write, "dtypes", body)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
