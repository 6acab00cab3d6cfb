"""The server under load, from a separate process on loopback: mixed-task throughput, latency, uploads, scale.

Usage:
    python -m benchmarks.server [--tasks 1 100 10000] [--seconds 10] [--rounds 3] [--concurrency 16]
                                [--write docs/benchmarks.md] [--json]
    python -m benchmarks.server --registered 1000000 [--without-index] [--write docs/benchmarks.md]

Throughput: a real `recast serve` process (its own store directory, the default bank) answers predict
requests of one text each, sent by a load generator in another process (`--concurrency` connections,
bounded in time). Each phase spreads the requests over 1, 100 or 10,000 distinct tasks; phases are
interleaved round by round and the ratios are texts/s relative to the one-task phase of the same rounds.
Uploads: new versions of existing tasks are PUT one at a time; each must be servable by the very next
request. Scale (`--registered N`): N generated tasks in a directory store (with the task index the server
keeps; `--without-index`: without, and the first start that builds it is reported too), then start-up time
and resident memory of the server, and one prediction on a random task.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from tqdm.auto import tqdm

from benchmarks.sections import replace_section
from recast_core.artifact import TaskArtifact
from recast_core.backbone import load_text_backbone, sample_sentences
from recast_core.bank import TemplateBank
from server.runtime import load_or_build_bank
from server.stores.directory import LIVE
from server.stores.index import LIVE as LIVE_ROW
from server.stores.index import IndexRow, row_of
from server.stores.journal import write_index

DEFAULT_BANK = Path(".cache/banks/minilm-default")


def synthetic_artifact(bank: TemplateBank, seed: int, hidden: int = 384) -> TaskArtifact:
    """A valid task for `bank`: coefficients near the bank's own, a random head over 2-6 labels."""
    gen = torch.Generator().manual_seed(seed)
    base = bank.base_coefficients.mean(dim=1).to(torch.float32)
    labels = tuple(f"label{i}" for i in range(2 + seed % 5))
    return TaskArtifact(
        coefficients=base + 0.05 * torch.randn(base.shape, generator=gen),
        head_weight=torch.randn(len(labels), hidden, generator=gen) * 0.1,
        head_bias=torch.zeros(len(labels)),
        labels=labels,
        bank_fingerprint=bank.fingerprint,
        training={"synthetic": True, "seed": seed},
    )


def fill_store(root: Path, bank: TemplateBank, count: int, distinct: int = 1000, index: bool = True) -> None:
    """`count` tasks (`task-0000000` ...) written straight into a directory store's layout, version 1,
    with the task index the server keeps (index=False: without, so the server's first start builds it).

    Benchmark fixture data: written without fsync, `distinct` different artifacts cycled.
    """
    blobs = [synthetic_artifact(bank, seed).to_bytes() for seed in range(min(count, distinct))]
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


def _load(url: str, task_ids: list[str], seconds: float, concurrency: int, seed: int) -> dict[str, Any]:
    """Runs in the load-generator process: one-text predicts on random tasks for `seconds`."""
    texts = sample_sentences()
    rng = random.Random(seed)
    plan = [(rng.choice(task_ids), rng.choice(texts)) for _ in range(200_000)]
    latencies: list[float] = []
    errors: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    cursor = iter(range(len(plan)))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while time.monotonic() < deadline:
                task, text = plan[next(cursor)]
                start = time.perf_counter()
                response = http.post(f"/v1/tasks/{task}/predict", json={"inputs": [text]})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[response.status_code] = errors.get(response.status_code, 0) + 1

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    elapsed = time.monotonic() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "texts_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
    }


def run_load(url: str, task_ids: list[str], seconds: float, concurrency: int, seed: int) -> dict[str, Any]:
    """The load generator in a separate process (spawned), so it does not share the server's GIL."""
    with mp.get_context("spawn").Pool(1) as pool:
        result: dict[str, Any] = pool.apply(_load, (url, task_ids, seconds, concurrency, seed))
    return result


def upload_latency(url: str, bank: TemplateBank, count: int) -> dict[str, Any]:
    """PUT `count` new versions one by one; each must answer with its own version on the next request."""
    blobs = [synthetic_artifact(bank, 50_000 + i).to_bytes() for i in range(4)]
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
    fill_store(work / "tasks", bank, max(args.tasks))
    with server_process(bank_dir, work / "tasks", work / "server.log") as server:
        url = server["url"]
        run_load(url, ["task-0000000"], 3, args.concurrency, 0)  # warm-up
        phases: dict[int, list[dict[str, Any]]] = {n: [] for n in args.tasks}
        for r in tqdm(range(args.rounds), desc="rounds", unit="round"):
            for n in args.tasks:
                ids = [f"task-{i:07d}" for i in range(n)]
                phases[n].append(run_load(url, ids, args.seconds, args.concurrency, seed=r))
        uploads = upload_latency(url, bank, args.uploads)
        metrics = httpx.get(f"{url}/metrics").text
        rss = rss_mib(server["pid"])
    base = statistics.median(p["texts_per_s"] for p in phases[args.tasks[0]])
    rows = []
    for n, runs in phases.items():
        tps = statistics.median(p["texts_per_s"] for p in runs)
        rows.append(
            {
                "tasks": n,
                "texts_per_s": round(tps, 1),
                "vs_one_task": round(tps / base, 3),
                "p50_ms": round(statistics.median(p["p50_ms"] for p in runs), 1),
                "p99_ms": round(statistics.median(p["p99_ms"] for p in runs), 1),
                "errors": sum(sum(p["errors"].values()) for p in runs),
            }
        )
    batch = [line for line in metrics.splitlines() if line.startswith("recast_batch_texts_")]
    count = float(next(line.split()[-1] for line in batch if line.startswith("recast_batch_texts_count")))
    total = float(next(line.split()[-1] for line in batch if line.startswith("recast_batch_texts_sum")))
    return {
        "rows": rows,
        "uploads": uploads,
        "mean_batch_texts": round(total / count, 1),
        "rss_mib": round(rss),
    }


def registered(
    work: Path, bank_dir: Path, bank: TemplateBank, count: int, index: bool = True
) -> dict[str, Any]:
    """Start-up time and memory with `count` stored tasks; without an index, a first start (which builds
    it from every artifact) and a second one (which reads it)."""
    fill_store(work / "tasks", bank, count, index=index)
    starts = []
    for _ in range(1 if index else 2):
        with server_process(bank_dir, work / "tasks", work / "server.log") as server:
            rss, peak = rss_mib(server["pid"]), _peak_rss_mib(server["pid"])
            task = f"task-{random.randrange(count):07d}"
            answer = httpx.post(
                f"{server['url']}/v1/tasks/{task}/predict", json={"inputs": ["hello"]}, timeout=60
            )
            listed = httpx.get(f"{server['url']}/v1/tasks", params={"limit": 1}, timeout=60).json()["total"]
            starts.append(
                {
                    "startup_s": round(server["startup_s"], 1),
                    "rss_mib": round(rss),
                    "peak_rss_mib": round(peak),
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
    lines = [
        f"Command: `python -m benchmarks.server --tasks {' '.join(map(str, args.tasks))} "
        f"--seconds {args.seconds:g} --rounds {args.rounds} --concurrency {args.concurrency} "
        f"--write docs/benchmarks.md` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} "
        "cores shared by the server and the load generator, one text per request, median over the rounds).",
        "",
        "| distinct tasks | texts/s | vs one task | p50 ms | p99 ms | errors |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['tasks']} | {r['texts_per_s']} | {r['vs_one_task']:.3f} | {r['p50_ms']} | {r['p99_ms']} "
            f"| {r['errors']} |"
        )
    u = result["uploads"]
    lines += [
        "",
        f"Mean texts per batched forward: {result['mean_batch_texts']}; server RSS after the run: "
        f"{result['rss_mib']} MiB. Uploads (directory store, fsync on every write): {u['uploads']} new "
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
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--bank", type=Path, default=DEFAULT_BANK)
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
        result = registered(work, args.bank, bank, args.registered, index=not args.without_index)
        flag = " --without-index" if args.without_index else ""
        first = (
            f"the first start built the task index from every artifact in {result['first_startup_s']} s; "
            "on the second start "
            if args.without_index
            else "with the task index the server keeps, "
        )
        body = (
            f"Command: `python -m benchmarks.server --registered {args.registered}{flag} "
            f"--write docs/benchmarks.md` ({time.strftime('%Y-%m-%d')}): {result['listed']:,} tasks in a "
            f"directory store; {first}the server was "
            f"ready {result['startup_s']} s after launch, resident memory {result['rss_mib']:,} MiB "
            f"(peak {result['peak_rss_mib']:,} MiB; {result['rss_bytes_per_task']:,} bytes per task, "
            "backbone and bank included; classifier heads read back from the store on first use and held "
            "within the default 1 GiB budget); a prediction on a random task answered "
            f"{result['predict_status']}."
        )
        section = "server-scale"
    else:
        result = throughput(work, args.bank, bank, args)
        body = render(result, args)
        section = "server"
    print(body)
    if args.write:
        replace_section(args.write, section, body)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
