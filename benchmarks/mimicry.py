"""Time and fidelity of Neural Mimicry on MiniLM: the default and a compressed bank, svd vs paper.

Usage: python -m benchmarks.mimicry [--iterations 1000] [--write docs/benchmarks.md]

All configurations run in one process, one after the other, on the same sample of real sentences.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.sections import replace_section
from recast_core.backbone import load_text_backbone
from recast_core.config import minilm_config
from recast_core.mimicry import PaperSchedule, mimic

CONFIGS = {
    "default (G=3, n=2, K=2)": minilm_config(),
    "compressed (G=1, n=3, K=2)": minilm_config(groups=1, templates=3),
    "compressed (G=3, n=1, K=2)": minilm_config(groups=3, templates=1),
}


def run(iterations: int) -> list[dict[str, object]]:
    backbone = load_text_backbone()
    probe = backbone.probe()
    rows: list[dict[str, object]] = []
    for label, config in CONFIGS.items():
        for method in ("svd", "paper"):
            result = mimic(
                backbone.model, config, method, probe=probe, schedule=PaperSchedule(iterations=iterations)
            )
            rep = result.report
            rows.append(
                {
                    "config": label,
                    "method": method,
                    "seconds": round(rep.seconds, 2),
                    "output_cosine": rep.output_cosine,
                    "output_cosine_min": rep.output_cosine_min,
                    "max_relative_error": rep.max_relative_error,
                    "mean_relative_error": rep.mean_relative_error,
                    "coefficients_per_task": result.bank.num_slots * config.templates,
                    "bank_mib": round(result.bank.nbytes() / 2**20, 2),
                }
            )
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| config | method | seconds | output cosine (mean / min) | max rel. error | mean rel. error "
        "| coefficients per task | bank MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['method']} | {r['seconds']} | {r['output_cosine']:.8f} / "
            f"{r['output_cosine_min']:.8f} | {r['max_relative_error']:.6g} | {r['mean_relative_error']:.4g} "
            f"| {r['coefficients_per_task']} | {r['bank_mib']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=1000, help="paper method iterations")
    parser.add_argument("--write", type=Path, help="replace the mimicry section of this markdown file")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line at the end")
    args = parser.parse_args()
    rows = run(args.iterations)
    body = (
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; paper method with {args.iterations} iterations; "
        "output cosine over 64 real sentences (mean-pooled embeddings).\n\n" + table(rows)
    )
    print(body)
    if args.write:
        replace_section(args.write, "mimicry", body)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
