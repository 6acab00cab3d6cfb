"""A bounded soak of a real `recast serve` process on loopback: steady predicts over many tasks while new
versions are uploaded and tasks are deleted and re-created, window by window.

Usage:
    python -m benchmarks.soak [--minutes 10] [--tasks 1000] [--concurrency 8] [--mutations-per-s 2]
                              [--window SECONDS] [--warmup 30] [--write docs/benchmarks.md] [--json]

The store (a directory) is filled with `--tasks` tasks before the server starts. `--concurrency` clients
send one-text predicts to random tasks, all of them. One more client changes tasks at `--mutations-per-s`:
three of every four changes upload a new version of a random task and predict on it at once (it must
answer with the new version), the fourth deletes a task (no predict is in flight on it or sent to it
meanwhile), checks that it answers 404, re-creates it and checks that the new version answers. After a
warm-up, each window (60 s, or a sixth of a shorter run) reports requests, errors, 429s (counted apart:
refusals under overload are deliberate), p50/p99 latency and the server's resident memory (VmRSS).
The summary gives the error rate, the p99 drift (last window / first), the RSS growth (last window - first)
and how many changes were servable on the next request. Exit status 1 if any error other than a 429 occurred.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from benchmarks.sections import replace_section
from benchmarks.server import DEFAULT_BANK, fill_store, rss_mib, server_process, synthetic_artifact
from recast_core.backbone import load_text_backbone, sample_sentences
from recast_core.bank import BANK_FILE, TemplateBank, load_bank
from server.runtime import load_or_build_bank

OCTET = {"Content-Type": "application/octet-stream"}


@dataclass
class Window:
    """What happened in one window; every field is written under Soak.lock."""

    latencies: list[float] = field(default_factory=list)  # seconds, answered predicts
    throttled: int = 0  # 429s
    # anything else, by kind: "predict 500", "upload ReadTimeout", "upload not servable at once"
    errors: Counter[str] = field(default_factory=Counter)
    uploads: int = 0
    deletes: int = 0

    def summary(self, index: int, seconds: float, rss: float, load: float) -> dict[str, Any]:
        lat = sorted(self.latencies)
        errors = sum(self.errors.values())
        sent = len(lat) + self.throttled + errors
        return {
            "window": index,
            "seconds": round(seconds, 1),
            "requests": sent,
            "answered": len(lat),
            "requests_per_s": round(sent / seconds, 1),
            "throttled_429": self.throttled,
            "errors": errors,
            "error_rate": errors / sent if sent else 0.0,
            "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
            "rss_mib": round(rss, 1),
            "load_average": round(load, 2),
            "uploads": self.uploads,
            "deletes": self.deletes,
        }


class Soak:
    """The load: predict clients and one client changing tasks, recording into the current window."""

    def __init__(self, url: str, task_ids: list[str], blobs: list[bytes], seed: int) -> None:
        self.url, self.task_ids, self.blobs, self.seed = url, task_ids, blobs, seed
        self.texts = sample_sentences()
        self.lock = threading.Lock()
        self.window = Window()
        self.stop = threading.Event()
        self.closed: set[str] = set()  # tasks being deleted and re-created: no predicts on them
        self.busy: Counter[str] = Counter()  # predicts in flight per task
        self.changes: Counter[str] = Counter()  # uploads, servable, deletes, gone, recreated, ...
        self.samples: list[str] = []  # the first few error messages

    def swap(self) -> Window:
        with self.lock:
            window, self.window = self.window, Window()
        return window

    def error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.window.errors[kind] += 1
            if len(self.samples) < 10:
                self.samples.append(f"{kind}: {detail[:300]}")

    def predicting(self, worker: int) -> None:
        rng = random.Random(self.seed * 1000 + worker)
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                task = rng.choice(self.task_ids)
                with self.lock:
                    if task in self.closed:
                        continue
                    self.busy[task] += 1
                try:
                    start = time.perf_counter()
                    response = http.post(
                        f"/v1/tasks/{task}/predict", json={"inputs": [rng.choice(self.texts)]}
                    )
                    seconds = time.perf_counter() - start
                except httpx.HTTPError as exc:
                    self.error(f"predict {type(exc).__name__}", str(exc))
                    continue
                finally:
                    with self.lock:
                        self.busy[task] -= 1
                if response.status_code == 200:
                    with self.lock:
                        self.window.latencies.append(seconds)
                elif response.status_code == 429:
                    with self.lock:
                        self.window.throttled += 1
                    self.stop.wait(0.05)
                else:
                    self.error(f"predict {response.status_code}", response.text)

    def changing(self, per_second: float) -> None:
        rng = random.Random(self.seed)
        with httpx.Client(base_url=self.url, timeout=30) as http:
            next_at = time.monotonic()
            for i in range(10**9):
                next_at += 1 / per_second
                if self.stop.wait(max(0.0, next_at - time.monotonic())):
                    return
                task = rng.choice(self.task_ids)
                try:
                    if i % 4 == 3:
                        self.delete_and_recreate(http, task, self.blobs[i % len(self.blobs)])
                    else:
                        self.upload(http, task, self.blobs[i % len(self.blobs)], "uploads")
                except Exception as exc:  # a transport error or an unexpected body: an error, and go on
                    self.error(f"change {type(exc).__name__}", str(exc))

    def upload(self, http: httpx.Client, task: str, blob: bytes, kind: str) -> None:
        """PUT a new version; the very next predict on the task must answer with it."""
        response = http.put(f"/v1/tasks/{task}", content=blob, headers=OCTET)
        with self.lock:
            self.window.uploads += 1
            self.changes[kind] += 1
        if response.status_code not in (200, 201):
            self.error(f"upload {response.status_code}", response.text)
            return
        version = response.json()["version"]
        answer = self.check(http, task)
        if answer.status_code == 200 and answer.json()["version"] == version:
            with self.lock:
                self.changes[f"{kind}_servable"] += 1
        else:
            self.error(
                "upload not servable at once", f"{task} v{version}: {answer.status_code} {answer.text}"
            )

    def delete_and_recreate(self, http: httpx.Client, task: str, blob: bytes) -> None:
        with self.lock:
            self.closed.add(task)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # predicts already sent on the task finish first
                with self.lock:
                    if not self.busy[task]:
                        break
                time.sleep(0.001)
            response = http.delete(f"/v1/tasks/{task}")
            with self.lock:
                self.window.deletes += 1
                self.changes["deletes"] += 1
            if response.status_code != 200:
                self.error(f"delete {response.status_code}", response.text)
                return
            gone = self.check(http, task)
            if gone.status_code == 404 and gone.json().get("error_type") == "unknown_task":
                with self.lock:
                    self.changes["deletes_gone"] += 1
            else:
                self.error("deleted task still answers", f"{task}: {gone.status_code} {gone.text}")
            self.upload(http, task, blob, "recreated")
        finally:
            with self.lock:
                self.closed.discard(task)

    def check(self, http: httpx.Client, task: str) -> httpx.Response:
        """One predict on `task`, repeated only while it is refused with 429."""
        for _ in range(20):
            response = http.post(f"/v1/tasks/{task}/predict", json={"inputs": ["is this the newest?"]})
            if response.status_code != 429:
                return response
            with self.lock:
                self.window.throttled += 1
            time.sleep(float(response.headers.get("retry-after", "1")))
        return response


def soak(url: str, pid: int, bank: TemplateBank, args: argparse.Namespace) -> dict[str, Any]:
    task_ids = [f"task-{i:07d}" for i in range(args.tasks)]
    blobs = [synthetic_artifact(bank, 100_000 + i).to_bytes() for i in range(16)]
    load = Soak(url, task_ids, blobs, args.seed)
    threads = [threading.Thread(target=load.predicting, args=(w,)) for w in range(args.concurrency)]
    threads.append(threading.Thread(target=load.changing, args=(args.mutations_per_s,)))
    total = args.minutes * 60
    window = args.window or min(60.0, total / 6)
    count = max(1, round(total / window))
    windows: list[dict[str, Any]] = []
    for thread in threads:
        thread.start()
    try:
        load.stop.wait(args.warmup)
        warmup = load.swap().summary(-1, args.warmup or 1.0, rss_mib(pid), 0.0)  # not reported but counted
        start = time.monotonic()
        with tqdm(total=round(count * window), desc="soak", unit="s") as bar:
            for index in range(count):
                end = start + (index + 1) * window
                while (now := time.monotonic()) < end:
                    time.sleep(min(1.0, end - now))
                    bar.n = min(bar.total, round(time.monotonic() - start))
                    with load.lock:
                        errors = sum(load.window.errors.values())
                    bar.set_postfix(errors=errors, rss=f"{rss_mib(pid):.0f}MiB", refresh=True)
                row = load.swap().summary(index, window, rss_mib(pid), os.getloadavg()[0])
                windows.append(row)
                bar.write(
                    f"window {index}: {row['requests']} requests, {row['errors']} errors, "
                    f"{row['throttled_429']} 429s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                    f"RSS {row['rss_mib']} MiB",
                    file=sys.stderr,
                )
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=60)
    tail = load.swap().summary(count, 1.0, 0.0, 0.0)  # requests that finished after the last window
    listed = httpx.get(f"{url}/v1/tasks", params={"limit": 1}, timeout=30).json()["total"]
    everything = [warmup, *windows, tail]
    errors = sum(w["errors"] for w in everything)
    sent = sum(w["requests"] for w in everything)
    first, last = windows[0], windows[-1]
    changes = load.changes
    return {
        "minutes": args.minutes,
        "tasks": args.tasks,
        "concurrency": args.concurrency,
        "mutations_per_s": args.mutations_per_s,
        "window_s": window,
        "warmup_s": args.warmup,
        "windows": windows,
        "requests": sent,  # warm-up and stragglers after the last window included
        "throttled_429": sum(w["throttled_429"] for w in everything),
        "errors": errors,
        "error_rate": errors / sent if sent else 0.0,
        "error_samples": load.samples,
        "p99_drift": round(last["p99_ms"] / first["p99_ms"], 3)
        if first["p99_ms"] and last["p99_ms"]
        else None,
        "rss_first_mib": first["rss_mib"],
        "rss_last_mib": last["rss_mib"],
        "rss_growth_mib": round(last["rss_mib"] - first["rss_mib"], 1),
        "uploads": changes["uploads"],
        "uploads_servable_on_next_request": changes["uploads_servable"],
        "deletes": changes["deletes"],
        "deletes_404_on_next_request": changes["deletes_gone"],
        "recreated": changes["recreated"],
        "recreated_servable_on_next_request": changes["recreated_servable"],
        "all_changes_servable": changes["uploads"] == changes["uploads_servable"]
        and changes["deletes"]
        == changes["deletes_gone"]
        == changes["recreated"]
        == changes["recreated_servable"],
        "tasks_listed_after": listed,
        "mean_load_average": round(sum(w["load_average"] for w in windows) / len(windows), 2),
    }


def command(args: argparse.Namespace) -> str:
    words = ["python", "-m", "benchmarks.soak", "--minutes", f"{args.minutes:g}", "--tasks", str(args.tasks)]
    words += ["--concurrency", str(args.concurrency), "--mutations-per-s", f"{args.mutations_per_s:g}"]
    if args.window:
        words += ["--window", f"{args.window:g}"]
    words += ["--warmup", f"{args.warmup:g}"]
    if args.seed:
        words += ["--seed", str(args.seed)]
    if args.bank != DEFAULT_BANK:
        words += ["--bank", str(args.bank)]
    if args.write:
        words += ["--write", str(args.write)]
    return shlex.join(words)


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    r = result
    lines = [
        f"Command: `{command(args)}` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} cores shared by the server and the load generator; mean host load average over "
        f"the windows {r['mean_load_average']}). {r['tasks']:,} tasks in a directory store, "
        f"{r['concurrency']} clients sending one-text predicts to random tasks, {r['mutations_per_s']:g} "
        "task changes per second (3 in 4 upload a new version, 1 in 4 deletes a task and re-creates it); "
        f"{r['warmup_s']:g} s of warm-up, then windows of {r['window_s']:g} s.",
    ]
    if args.note:
        lines += ["", args.note]
    lines += [
        "",
        "| window | requests | req/s | errors | 429s | p50 ms | p99 ms | server RSS MiB | uploads "
        "| deletes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cells = ["window", "requests", "requests_per_s", "errors", "throttled_429", "p50_ms", "p99_ms"]
    cells += ["rss_mib", "uploads", "deletes"]
    for w in r["windows"]:
        lines.append("| " + " | ".join(str(w[c]) for c in cells) + " |")
    lines += [
        "",
        f"Errors: {r['errors']} of {r['requests']:,} requests, warm-up included (error rate "
        f"{r['error_rate']:.2%}; 429s, counted apart: {r['throttled_429']}). p99 drift (last window / "
        f"first): {r['p99_drift']}. Server RSS {r['rss_first_mib']} MiB in the first window, "
        f"{r['rss_last_mib']} MiB in the last ({r['rss_growth_mib']:+} MiB). Uploads: "
        f"{r['uploads_servable_on_next_request']} of {r['uploads']} answered with their new version on the "
        f"next request; deletes: {r['deletes_404_on_next_request']} of {r['deletes']} answered 404 at once, "
        f"and {r['recreated_servable_on_next_request']} of {r['recreated']} re-created tasks answered with "
        f"their new version; {r['tasks_listed_after']:,} tasks listed at the end.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="measured time, after the warm-up")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8, help="predict clients")
    parser.add_argument("--mutations-per-s", type=float, default=2.0, help="task changes per second")
    parser.add_argument("--window", type=float, help="seconds per window (default 60, or a sixth of the run)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of load before the first window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bank", type=Path, default=DEFAULT_BANK)
    parser.add_argument("--note", help="a sentence printed under the command in the written section")
    parser.add_argument("--json", action="store_true", help="last line: the results as one JSON object")
    parser.add_argument("--write", type=Path, help="replace the soak section of a markdown file")
    args = parser.parse_args()
    if args.minutes <= 0 or args.tasks < 1 or args.concurrency < 1 or args.mutations_per_s <= 0:
        parser.error("--minutes, --tasks, --concurrency and --mutations-per-s must be positive")
    if (args.bank / BANK_FILE).is_file():
        bank = load_bank(args.bank)
    else:
        bank = load_or_build_bank(args.bank, load_text_backbone())
    with tempfile.TemporaryDirectory(prefix="recast-soak-") as work:
        fill_store(Path(work) / "tasks", bank, args.tasks)
        log = Path(work) / "server.log"
        with server_process(args.bank, Path(work) / "tasks", log) as server:
            result = soak(server["url"], server["pid"], bank, args)
        if result["errors"]:
            print("--- end of the server log ---", file=sys.stderr)
            print("\n".join(log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
    body = render(result, args)
    print(body)
    if args.write:
        replace_section(args.write, "soak", body)
    if args.json:
        print(json.dumps(result))
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
