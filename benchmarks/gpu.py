"""The GPU benchmark, one command for a GPU host: kernels side by side, then the server under wrk.

Usage:
    python -m benchmarks.gpu [--batches 1 32 256] [--rounds 20] [--write docs/benchmarks.md] [--json]
                             [--server-seconds 15] [--no-server]

On a machine without CUDA it prints "no CUDA device" and exits 0.

Kernels: in one process, interleaved round by round, at 64 tokens per sequence, in float16 and (where the
GPU has it natively) bfloat16, each against the plain backbone in the same dtype:
    plain       the original MiniLM
    hetero      this project's path, every sequence a different task (the Triton kernels)
    homo        this project's path, every sequence the same task
    peft_mixed  PEFT LoRA r=8 on the same modules, one adapter per sequence (`adapter_names`)
Targets for whoever runs it: hetero >= 0.9 x plain at batch 32 and 256, ahead of peft_mixed.

Server: `recast serve --device cuda` with 1 and 100 tasks, loaded by wrk (Debian's `wrk`, a compiled
client that does not compete with the server for the GPU) through a Lua script that picks the task per
request, one text per request; texts/s and latency percentiles as wrk reports them.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.kernels import SEQUENCE_LENGTH, Forward, _peft, _task_table, _tokens, measure
from benchmarks.sections import replace_section
from kernels import Kernels
from recast_core.backbone import SentenceEncoder, TextBackbone, load_text_backbone
from recast_core.bank import TemplateBank
from recast_core.config import minilm_config
from recast_core.device import dtype_name
from recast_core.mimicry import mimic
from recast_core.multitask import MultiTaskEncoder

WRK_SCRIPT = """
local tasks = {TASKS}
request = function()
  local task = tasks[math.random(#tasks)]
  return wrk.format("POST", "/v1/tasks/" .. task .. "/predict", {["Content-Type"] = "application/json"},
                    '{"inputs": ["how far is the moon from the earth?"]}')
end
"""


def dtypes(device: torch.device) -> list[torch.dtype]:
    found = [torch.float16]
    if torch.cuda.is_bf16_supported(including_emulation=False):
        found.append(torch.bfloat16)
    return found


def methods(
    backbone: TextBackbone, bank: TemplateBank, batch: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Forward]:
    ids, mask = _tokens(backbone, batch, device)
    plain = SentenceEncoder(copy.deepcopy(backbone.model).to(device=device, dtype=dtype)).eval()
    encoder = MultiTaskEncoder(backbone, bank, Kernels(device), dtype)
    table = _task_table(bank, batch)
    every, same = torch.arange(batch), torch.zeros(batch, dtype=torch.long)
    keys = [f"task-{i}" for i in range(batch)]
    peft = _peft(backbone, batch, device).to(dtype)
    names = [f"t{i}" for i in range(batch)]
    host_ids, host_mask = ids.cpu(), mask.cpu()  # the encoder copies its inputs in, as in serving
    return {
        "plain": lambda: plain(ids, mask),
        "hetero": lambda: encoder(host_ids, host_mask, every, table, keys),
        "homo": lambda: encoder(host_ids, host_mask, same, table[:1], keys[:1]),
        "peft_mixed": lambda: peft(input_ids=ids, attention_mask=mask, adapter_names=names),
    }


def kernel_rows(batches: list[int], rounds: int, device: torch.device) -> list[dict[str, Any]]:
    backbone = load_text_backbone()
    bank = mimic(backbone.model, minilm_config(), "svd", progress=False).bank
    rows = []
    for dtype in dtypes(device):
        for batch in batches:
            forwards = methods(backbone, bank, batch, device, dtype)
            seconds = measure(forwards, rounds, device, f"{dtype_name(dtype)} batch {batch}")
            plain = seconds["plain"]
            row: dict[str, Any] = {"dtype": dtype_name(dtype), "batch": batch, "tokens": SEQUENCE_LENGTH}
            row["plain_seq_per_s"] = round(batch / plain, 1)
            row |= {f"{name}_vs_plain": round(plain / s, 3) for name, s in seconds.items() if name != "plain"}
            rows.append(row)
    return rows


def wrk_phase(url: str, tasks: list[str], seconds: int, connections: int = 32) -> dict[str, Any]:
    """wrk against `url`, each request for a random one of `tasks`; requests/s and latency from wrk."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.replace("{TASKS}", "{" + ",".join(f'"{t}"' for t in tasks) + "}"))
    done = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    out = done.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "tasks": len(tasks),
        "texts_per_s": rate,
        "p50": latency.get("50"),
        "p99": latency.get("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def server_rows(seconds: int) -> list[dict[str, Any]]:
    from benchmarks.server import server_process, synthetic_artifact
    from server.runtime import load_or_build_bank

    if shutil.which("wrk") is None:
        raise SystemExit("the server part needs wrk (apt-get install wrk), or pass --no-server")
    work = Path(tempfile.mkdtemp(prefix="recast-gpu-bench-"))
    bank_dir = Path(".cache/banks/minilm-default")
    bank = load_or_build_bank(bank_dir, load_text_backbone())
    env = {"RECAST_DEVICE": "cuda", "RECAST_MAX_BATCH_TEXTS": "256"}
    rows = []
    with server_process(bank_dir, work / "tasks", work / "server.log", env=env) as server:
        with httpx.Client(base_url=server["url"], timeout=60) as http:
            for i in range(100):
                data = synthetic_artifact(bank, i).to_bytes()
                http.put(
                    f"/v1/tasks/task-{i}", content=data, headers={"Content-Type": "application/octet-stream"}
                )
        for tasks in ([f"task-{0}"], [f"task-{i}" for i in range(100)]):
            rows.append(wrk_phase(server["url"], tasks, seconds))
    shutil.rmtree(work, ignore_errors=True)
    return rows


def report(device: torch.device, kernels: list[dict[str, Any]], server: list[dict[str, Any]]) -> str:
    lines = [
        f"GPU: {torch.cuda.get_device_name(device)}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"host CPU {platform.processor() or platform.machine()}. Command: `python -m benchmarks.gpu`.",
        "",
        "| dtype | batch x 64 | plain seq/s | hetero | homo | PEFT mixed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in kernels:
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {r['plain_seq_per_s']:.1f} | {r['hetero_vs_plain']:.3f} "
            f"| {r['homo_vs_plain']:.3f} | {r['peft_mixed_vs_plain']:.3f} |"
        )
    if server:
        lines += ["", "| server, tasks | texts/s (wrk) | p50 | p99 | non-2xx |", "|---:|---:|---|---|---:|"]
        lines += [
            f"| {r['tasks']} | {r['texts_per_s']:.1f} | {r['p50']} | {r['p99']} | {r['non_2xx']} |"
            for r in server
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--server-seconds", type=int, default=15)
    parser.add_argument("--no-server", action="store_true", help="kernels only")
    parser.add_argument("--write", type=Path, help="replace the gpu section of this markdown file")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: python -m benchmarks.gpu measures a GPU host; nothing to do here")
        return
    device = torch.device("cuda", 0)
    kernels = kernel_rows(args.batches, args.rounds, device)
    server = [] if args.no_server else server_rows(args.server_seconds)
    text = report(device, kernels, server)
    print(text)
    if args.json:
        print(json.dumps({"kernels": kernels, "server": server}, indent=2))
    if args.write:
        replace_section(args.write, "gpu", "## GPU\n\n" + text)


if __name__ == "__main__":
    main(sys.argv[1:])
