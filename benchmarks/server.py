"""The server under load, from a separate process on loopback: mixed-task throughput, latency, uploads, scale.

Usage:
    python -m benchmarks.server [--tasks 1 100 10000] [--seconds 10] [--rounds 3] [--concurrency 16]
                                [--write docs/benchmarks.md] [--json]
    python -m benchmarks.server --registered 1000000 [--without-index] [--write docs/benchmarks.md]

Throughput: a real `recast serve` process (its own store directory, the default bank) answers predict
requests sent by wrk (benchmarks/wrk.py: compiled, one thread, `--concurrency` connections, bounded in
time), with 1 or 16 of the bundled tasks' test texts per request, spread over 1, 100 or 10,000 distinct
tasks. Phases are interleaved round by round with the plain backbone's forward in this process (same
dtype, same texts, the batch size the load allows) as the limit; ratios are texts/s relative to the
one-task phase and to that limit in the same rounds, with the server's CPU share, wrk's, and the mean
batch the server formed. Uploads (Python: each checks the version it gets back): new versions of existing
tasks are PUT one at a time; each must be servable by the very next request.

Scale (`--registered N`): N generated tasks in a directory store (with the task index the server keeps;
`--without-index`: without, and the first start that builds it is reported too), then start-up time and
resident memory of the server, and one prediction on a random task.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from tqdm.auto import tqdm

from benchmarks.sections import replace_section
from recast_core.artifact import TaskArtifact
from recast_core.backbone import load_text_backbone
from recast_core.bank import TemplateBank
from recast_core.ffn_edit import edit_shape
from recast_core.train_options import CAPACITIES
from server.runtime import load_or_build_bank
from server.settings import Settings
from server.stores.directory import LIVE
from server.stores.index import LIVE as LIVE_ROW
from server.stores.index import IndexRow, row_of
from server.stores.journal import write_index

DEFAULT_BANK = Path(".cache/banks/minilm-default")


def synthetic_artifact(bank: TemplateBank, seed: int, hidden: int = 384, edit: bool = False) -> TaskArtifact:
    """A valid task for `bank`: coefficients near the bank's own, a random head over 2-6 labels and, with
    `edit`, an FFN edit near the identity (what `--capacity ffn_edit` trains)."""
    gen = torch.Generator().manual_seed(seed)
    base = bank.base_coefficients.mean(dim=1).to(torch.float32)
    labels = tuple(f"label{i}" for i in range(2 + seed % 5))
    shape = edit_shape(bank.layout) if edit else None
    if edit and shape is None:
        raise ValueError("the bank has no FFN output kind to edit")
    return TaskArtifact(
        coefficients=base + 0.05 * torch.randn(base.shape, generator=gen),
        head_weight=torch.randn(len(labels), hidden, generator=gen) * 0.1,
        head_bias=torch.zeros(len(labels)),
        labels=labels,
        bank_fingerprint=bank.fingerprint,
        training={"synthetic": True, "seed": seed},
        ffn_scale=None if shape is None else 1 + 0.05 * torch.randn(shape, generator=gen),
        ffn_shift=None if shape is None else 0.02 * torch.randn(shape, generator=gen),
    )


DISTINCT_ARTIFACTS = 1000


def fill_store(
    root: Path,
    bank: TemplateBank,
    count: int,
    distinct: int = DISTINCT_ARTIFACTS,
    index: bool = True,
    edit: bool = False,
) -> None:
    """`count` tasks (`task-0000000` ...) written straight into a directory store's layout, version 1,
    with the task index the server keeps (index=False: without, so the server's first start builds it).

    Benchmark fixture data: written without fsync, `distinct` different artifacts cycled (each with an
    FFN edit when `edit`).
    """
    blobs = [synthetic_artifact(bank, seed, edit=edit).to_bytes() for seed in range(min(count, distinct))]
    mtime_ns = time.time_ns() // 1_000_000 * 1_000_000  # the store's `updated`: a file's mtime, in ms
    for i in tqdm(range(count), desc=f"writing {count} tasks", unit="task", mininterval=2):
        directory = root / f"task-{i:07d}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{1:012d}{LIVE}"
        path.write_bytes(blobs[i % len(blobs)])
        os.utime(path, ns=(mtime_ns, mtime_ns))
    if index:
        updated = datetime.fromtimestamp(mtime_ns // 10**9, UTC).replace(
            microsecond=mtime_ns // 10**6 % 1000 * 1000
        )
        stamp = updated.isoformat(timespec="milliseconds")
        summaries = [row_of("", 1, stamp, blob).summary for blob in blobs]
        rows = (
            IndexRow(f"task-{i:07d}", 1, stamp, LIVE_ROW, summaries[i % len(blobs)]) for i in range(count)
        )
        write_index(root, rows)


@contextmanager
def server_process(
    bank: Path, store: Path | str, log: Path, timeout: float = 3600, env: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """`recast serve` on a free loopback port; yields url, pid and the seconds it took to become ready.

    `store` is a directory or a `postgresql://` URL; `env` adds RECAST_* settings for the server process."""
    from socket import socket

    with socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    defaults = {"RECAST_MAX_QUEUE_TEXTS": "4096", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process_env = os.environ | defaults | (env or {})
    command = [sys.executable, "-m", "recast_cli.main", "serve", "--port", str(port)]
    command += ["--bank", str(bank), "--store", str(store)]
    start = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=process_env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"the server was not ready within {timeout} s; see {log}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield {"url": url, "pid": proc.pid, "startup_s": time.monotonic() - start}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _batch_totals(url: str) -> tuple[float, float]:
    """(texts, forwards) the server has batched so far, from /metrics."""
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    values = {}
    for line in metrics.splitlines():
        name, _, value = line.partition(" ")
        if name in ("recast_batch_texts_sum", "recast_batch_texts_count"):
            values[name] = float(value)
    return values.get("recast_batch_texts_sum", 0.0), values.get("recast_batch_texts_count", 0.0)


def _merged_statuses(runs: list[dict[str, Any]]) -> dict[str, int]:
    """Non-2xx answers by status code over the runs."""
    merged: dict[str, int] = {}
    for run in runs:
        for status, count in run.get("statuses", {}).items():
            merged[status] = merged.get(status, 0) + count
    return dict(sorted(merged.items()))


def _errors_cell(row: dict[str, Any]) -> str:
    """`0`, or the total with each status and the socket errors, e.g. `3 (429: 2, socket: 1)`."""
    if not row["errors"]:
        return "0"
    parts = [f"{status}: {count}" for status, count in row.get("statuses", {}).items()]
    if row["socket_errors"]:
        parts.append(f"socket: {row['socket_errors']}")
    return f"{row['errors']} ({', '.join(parts)})"


def warm_heads(url: str, count: int) -> None:
    """One predict on each of the first `count` tasks: every distinct artifact's head is then cached
    (heads are cached by digest and the store cycles DISTINCT_ARTIFACTS artifacts), so the phases
    measure steady serving rather than the first read of each head from the store."""
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in tqdm(range(count), desc="warming heads", unit="task", mininterval=2):
            http.post(f"/v1/tasks/task-{i:07d}/predict", json={"inputs": ["warm"]}).raise_for_status()


def plain_limit(
    encoder: torch.nn.Module, tokenizer: Any, texts: list[str], batch: int, seconds: float, seed: int
) -> float:
    """Texts/s of the plain backbone in this process on batches of `batch` random texts, padded as the
    server pads: the most the server could do with batches of that size."""
    rng = random.Random(seed)
    done, start = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            chosen = [rng.choice(texts) for _ in range(batch)]
            enc = tokenizer(chosen, padding="longest", truncation=True, max_length=128, return_tensors="pt")
            encoder(enc["input_ids"], enc["attention_mask"])
            done += batch
    return done / (time.perf_counter() - start)


def upload_latency(url: str, bank: TemplateBank, count: int, edit: bool = False) -> dict[str, Any]:
    """PUT `count` new versions one by one; each must answer with its own version on the next request."""
    blobs = [synthetic_artifact(bank, 50_000 + i, edit=edit).to_bytes() for i in range(4)]
    put_ms, server_ms, servable = [], [], 0
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in range(count):
            task = f"upload-{i % 10}"
            start = time.perf_counter()
            response = http.put(
                f"/v1/tasks/{task}",
                content=blobs[i % 4],
                headers={"Content-Type": "application/octet-stream"},
            )
            put_ms.append(1000 * (time.perf_counter() - start))
            server_ms.append(float(response.headers["server-timing"].partition("dur=")[2]))
            version = response.json()["version"]
            answer = http.post(f"/v1/tasks/{task}/predict", json={"inputs": ["is it servable yet?"]})
            servable += answer.status_code == 200 and answer.json()["version"] == version
    put_ms.sort()
    server_ms.sort()
    p99 = min(count - 1, int(count * 0.99))
    return {
        "uploads": count,
        "put_p50_ms": put_ms[count // 2],
        "put_p99_ms": put_ms[p99],
        "server_p50_ms": server_ms[count // 2],
        "server_p99_ms": server_ms[p99],
        "servable_on_next_request": servable,
    }


def throughput(work: Path, bank_dir: Path, bank: TemplateBank, args: argparse.Namespace) -> dict[str, Any]:
    """wrk against a real server: every (texts per request, distinct tasks) phase and the plain-backbone
    limit of each batch size, interleaved round by round."""
    from benchmarks.kernels import DTYPES, natural_texts
    from benchmarks.wrk import Workload, ensure_wrk
    from benchmarks.wrk import run as run_wrk
    from recast_core.backbone import SentenceEncoder

    wrk = ensure_wrk()
    fill_store(work / "tasks", bank, max(args.tasks), edit=args.capacity == "ffn_edit")
    max_chars = Settings().max_input_chars  # the server refuses longer texts with a 400, as it should
    texts = [t for t in natural_texts() if len(t) <= max_chars]
    workloads = {
        n: Workload.write(work / "wrk", [f"task-{i:07d}" for i in range(n)], texts, f"n{n}")
        for n in args.tasks
    }
    backbone = load_text_backbone()
    from recast_core.device import resolve_dtype

    dtype = DTYPES[args.dtype] if args.dtype != "auto" else resolve_dtype("auto", torch.device("cpu"))
    plain = SentenceEncoder(backbone.model.to(dtype)).eval()
    limit_batch = {k: min(args.max_batch, k * args.concurrency) for k in args.texts_per_request}
    env = {"RECAST_DTYPE": args.dtype, "RECAST_MAX_BATCH_TEXTS": str(args.max_batch)}
    with server_process(bank_dir, work / "tasks", work / "server.log", env=env) as server:
        url, pid = server["url"], server["pid"]
        warm_heads(url, min(max(args.tasks), DISTINCT_ARTIFACTS))
        for k in args.texts_per_request:  # warm-up: the CPU path measures its variants for these batches
            for n in args.tasks[:2]:
                run_wrk(wrk, url, workloads[n], k, 3, args.concurrency, seed=0)
        phases: dict[tuple[int, int], list[dict[str, Any]]] = {
            (k, n): [] for k in args.texts_per_request for n in args.tasks
        }
        limits: dict[int, list[float]] = {b: [] for b in set(limit_batch.values())}
        for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
            for b in limits:
                limits[b].append(plain_limit(plain, backbone.tokenizer, texts, b, args.seconds / 2, seed=r))
            for k, n in phases:
                cpu0, (texts0, forwards0) = _cpu_seconds(pid), _batch_totals(url)
                result = run_wrk(wrk, url, workloads[n], k, args.seconds, args.concurrency, seed=r)
                cpu1, (texts1, forwards1) = _cpu_seconds(pid), _batch_totals(url)
                result["server_cpu"] = (cpu1 - cpu0) / result["elapsed_s"]
                result["mean_batch_texts"] = (texts1 - texts0) / max(1.0, forwards1 - forwards0)
                phases[(k, n)].append(result)
        uploads = upload_latency(url, bank, args.uploads, edit=args.capacity == "ffn_edit")
        backbone_info = httpx.get(f"{url}/v1/backbone", timeout=30).json()
        rss = rss_mib(pid)
    rows = []
    for (k, n), runs in phases.items():
        tps = statistics.median(p["texts_per_s"] for p in runs)
        base = statistics.median(p["texts_per_s"] for p in phases[(k, args.tasks[0])])
        limit = statistics.median(limits[limit_batch[k]])
        rows.append(
            {
                "texts_per_request": k,
                "tasks": n,
                "texts_per_s": round(tps, 1),
                "vs_one_task": round(tps / base, 3),
                "plain_limit_texts_per_s": round(limit, 1),
                "limit_batch": limit_batch[k],
                "vs_plain_limit": round(tps / limit, 3),
                "p50_ms": round(statistics.median(p["p50_us"] for p in runs) / 1e3, 1),
                "p99_ms": round(statistics.median(p["p99_us"] for p in runs) / 1e3, 1),
                "mean_batch_texts": round(statistics.median(p["mean_batch_texts"] for p in runs), 1),
                "server_cpu_percent": round(100 * statistics.median(p["server_cpu"] for p in runs)),
                "wrk_cpu_percent": round(
                    100 * statistics.median(p["wrk_cpu_s"] / p["elapsed_s"] for p in runs)
                ),
                "errors": sum(p["errors"] for p in runs),
                "status_errors": sum(p["status_errors"] for p in runs),
                "socket_errors": sum(p["socket_errors"] for p in runs),
                "statuses": _merged_statuses(runs),
            }
        )
    return {
        "rows": rows,
        "uploads": uploads,
        "rss_mib": round(rss),
        "dtype": backbone_info["dtype"],
        "variants": sorted(set(backbone_info["kernel"].get("variants", {}).values())),
    }


def registered(
    work: Path, bank_dir: Path, bank: TemplateBank, count: int, index: bool = True, edit: bool = False
) -> dict[str, Any]:
    """Start-up time and memory with `count` stored tasks (each with an FFN edit when `edit`); without an
    index, a first start (which builds it from every artifact) and a second one (which reads it). After
    each start, every distinct artifact's head (and edit) is read into the cache, and memory measured
    again."""
    fill_store(work / "tasks", bank, count, index=index, edit=edit)
    starts = []
    for _ in range(1 if index else 2):
        with server_process(bank_dir, work / "tasks", work / "server.log") as server:
            rss, peak = rss_mib(server["pid"]), _peak_rss_mib(server["pid"])
            task = f"task-{random.randrange(count):07d}"
            answer = httpx.post(
                f"{server['url']}/v1/tasks/{task}/predict", json={"inputs": ["hello"]}, timeout=60
            )
            listed = httpx.get(f"{server['url']}/v1/tasks", params={"limit": 1}, timeout=60).json()["total"]
            warm_heads(server["url"], min(count, DISTINCT_ARTIFACTS))
            starts.append(
                {
                    "startup_s": round(server["startup_s"], 1),
                    "rss_mib": round(rss),
                    "peak_rss_mib": round(peak),
                    "warm_rss_mib": round(rss_mib(server["pid"])),
                    "listed": listed,
                    "predict_status": answer.status_code,
                }
            )
    last = starts[-1]
    return {
        "registered": count,
        "listed": last["listed"],
        "startup_s": last["startup_s"],
        "first_startup_s": None if index else starts[0]["startup_s"],
        "rss_mib": last["rss_mib"],
        "peak_rss_mib": last["peak_rss_mib"],
        "warm_rss_mib": last["warm_rss_mib"],
        "capacity": "ffn_edit" if edit else "coefficients",
        "rss_bytes_per_task": round(last["rss_mib"] * 2**20 / count),
        "predict_status": last["predict_status"],
        "starts": starts,
    }


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    from kernels import cpu_features

    lines = [
        f"Command: `python -m benchmarks.server --dtype {args.dtype} "
        f"--tasks {' '.join(map(str, args.tasks))} "
        f"--texts-per-request {' '.join(map(str, args.texts_per_request))} --seconds {args.seconds:g} "
        f"--rounds {args.rounds} --concurrency {args.concurrency}"
        f"{' --capacity ffn_edit' if args.capacity == 'ffn_edit' else ''} --write docs/benchmarks.md` "
        f"({time.strftime('%Y-%m-%d')}, {cpu_features.describe()}, {platform.machine()}, {os.cpu_count()} "
        f"cores; server dtype {result['dtype']}, CPU variants used: {', '.join(result['variants']) or '-'}; "
        f"load from wrk, one thread, {args.concurrency} connections, the bundled tasks' test texts at "
        "random, after one predict on each distinct stored artifact so the heads are cached; median over "
        "the rounds). The plain limit is the plain backbone in the benchmark's own "
        "process, same dtype, same texts, batches of the size the load allows (connections x texts per "
        "request, at most the server's batch), measured between the phases.",
        "",
        "| texts/request | distinct tasks | texts/s | vs one task | plain limit texts/s (batch) | vs limit "
        "| p50 ms | p99 ms | mean batch | server CPU | wrk CPU | errors (by status) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['texts_per_request']} | {r['tasks']} | {r['texts_per_s']} | {r['vs_one_task']:.3f} "
            f"| {r['plain_limit_texts_per_s']} ({r['limit_batch']}) | {r['vs_plain_limit']:.3f} "
            f"| {r['p50_ms']} | {r['p99_ms']} | {r['mean_batch_texts']} | {r['server_cpu_percent']} % "
            f"| {r['wrk_cpu_percent']} % | {_errors_cell(r)} |"
        )
    u = result["uploads"]
    lines += [
        "",
        f"Server RSS after the run: {result['rss_mib']} MiB. Uploads (directory store, fsync on every "
        f"write; Python client, one at a time): {u['uploads']} new "
        f"versions; server-side, from the received body to the version being stored and servable, p50 "
        f"{u['server_p50_ms']:.2f} ms, p99 {u['server_p99_ms']:.2f} ms (PUT round trip p50 "
        f"{u['put_p50_ms']:.2f} ms, p99 {u['put_p99_ms']:.2f} ms); "
        f"{u['servable_on_next_request']} of {u['uploads']} answered by their new version on the very next "
        "request.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 100, 10_000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16, help="wrk connections")
    parser.add_argument("--texts-per-request", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="the server's RECAST_DTYPE"
    )
    parser.add_argument("--max-batch", type=int, default=64, help="the server's RECAST_MAX_BATCH_TEXTS")
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--bank", type=Path, default=DEFAULT_BANK)
    parser.add_argument(
        "--capacity",
        choices=CAPACITIES,
        default="coefficients",
        help="what the generated tasks carry: coefficients, or coefficients and an FFN edit",
    )
    parser.add_argument("--registered", type=int, help="instead: start-up and memory with this many tasks")
    parser.add_argument(
        "--without-index",
        action="store_true",
        help="with --registered: write no task index, so the first start builds it (both starts reported)",
    )
    parser.add_argument("--json", action="store_true", help="last line: the results as one JSON object")
    parser.add_argument("--write", type=Path, help="replace this benchmark's section of a markdown file")
    args = parser.parse_args()
    if args.tasks[0] != 1:
        parser.error("--tasks must start with 1 (the baseline)")
    backbone = load_text_backbone()
    bank = load_or_build_bank(args.bank, backbone)
    work = Path(tempfile.mkdtemp(prefix="recast-bench-server-"))
    try:
        report(work, bank, args)
    finally:
        print(f"removing {work}", file=sys.stderr)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def report(work: Path, bank: TemplateBank, args: argparse.Namespace) -> None:
    if args.registered:
        edit = args.capacity == "ffn_edit"
        result = registered(work, args.bank, bank, args.registered, index=not args.without_index, edit=edit)
        flag = (" --without-index" if args.without_index else "") + (" --capacity ffn_edit" if edit else "")
        first = (
            f"the first start built the task index from every artifact in {result['first_startup_s']} s; "
            "on the second start "
            if args.without_index
            else "with the task index the server keeps, "
        )
        body = (
            f"Command: `python -m benchmarks.server --registered {args.registered}{flag} "
            f"--write docs/benchmarks.md` ({time.strftime('%Y-%m-%d')}): {result['listed']:,} tasks in a "
            f"directory store{' (each with an FFN edit: 4,608 numbers)' if edit else ''}; {first}"
            "the server was "
            f"ready {result['startup_s']} s after launch, resident memory {result['rss_mib']:,} MiB "
            f"(peak {result['peak_rss_mib']:,} MiB; {result['rss_bytes_per_task']:,} bytes per task, "
            "backbone and bank included; classifier heads (and edits) read back from the store on first "
            "use and held within the default 1 GiB budget); a prediction on a random task answered "
            f"{result['predict_status']}; after one prediction on each of the "
            f"{min(args.registered, DISTINCT_ARTIFACTS):,} distinct artifacts the store cycles, "
            f"{result['warm_rss_mib']:,} MiB."
        )
        section = "server-scale-ffn-edit" if edit else "server-scale"
    else:
        result = throughput(work, args.bank, bank, args)
        body = render(result, args)
        section = "server-ffn-edit" if args.capacity == "ffn_edit" else "server"
    print(body)
    if args.write:
        replace_section(args.write, section, body)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
