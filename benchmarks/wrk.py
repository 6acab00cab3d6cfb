"""wrk (Debian's HTTP load tool, compiled C and LuaJIT) driving predict requests against a server.

One wrk process with one thread keeps `connections` requests in flight; its Lua script picks a random
task per request from a file of task ids and `texts` random texts from a file of JSON-encoded strings,
and prints one JSON line of results when done. wrk takes a few percent of one core at the rates this
server reaches, so the server gets the machine; `run` reports wrk's own CPU time to show it.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LUA = r"""
local tasks, texts, per_request = {}, {}, 1
local threads = {}
bad = {}  -- per thread: count of each non-2xx status, collected by done()

setup = function(thread)
  threads[#threads + 1] = thread
end

local function lines(path)
  local out = {}
  for line in io.lines(path) do
    if #line > 0 then out[#out + 1] = line end
  end
  return out
end

init = function(args)
  tasks, texts, per_request = lines(args[1]), lines(args[2]), tonumber(args[3])
  math.randomseed(tonumber(args[4]) + os.time())
end

request = function()
  local picked = {}
  for i = 1, per_request do picked[i] = texts[math.random(#texts)] end
  local body = '{"inputs": [' .. table.concat(picked, ",") .. ']}'
  local path = "/v1/tasks/" .. tasks[math.random(#tasks)] .. "/predict"
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
end

response = function(status, headers, body)
  if status > 299 then
    local key = tostring(status)
    bad[key] = (bad[key] or 0) + 1
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  local codes = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("bad") or {}) do
      codes[#codes + 1] = string.format('"%s": %d', status, count)
    end
  end
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, ' ..
    '"timeouts": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max, table.concat(codes, ", ")))
end
"""


class WrkMissing(RuntimeError):
    """wrk is not installed and could not be installed."""


def ensure_wrk() -> str:
    """The path of wrk, installing Debian's package with apt-get when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "wrk"],
            check=True,
            env=env,
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise WrkMissing(f"wrk is not installed and apt-get could not install it: {exc}") from None
    found = shutil.which("wrk")
    if not found:
        raise WrkMissing("apt-get installed wrk but it is not on PATH")
    return found


@dataclass(frozen=True)
class Workload:
    """Files the Lua script reads: task ids and JSON-encoded texts, one per line."""

    script: Path
    tasks: Path
    texts: Path

    @classmethod
    def write(cls, directory: Path, task_ids: list[str], texts: list[str], name: str) -> Workload:
        directory.mkdir(parents=True, exist_ok=True)
        script = directory / "predict.lua"
        script.write_text(LUA)
        tasks = directory / f"{name}-tasks.txt"
        tasks.write_text("\n".join(task_ids) + "\n")
        encoded = directory / "texts.jsonl"
        encoded.write_text("\n".join(json.dumps(t) for t in texts) + "\n")
        return cls(script, tasks, encoded)


def run(
    wrk: str,
    url: str,
    workload: Workload,
    texts_per_request: int,
    seconds: float,
    connections: int,
    seed: int,
) -> dict[str, Any]:
    """One bounded wrk run: texts/s of answered requests, p50/p99 in ms, errors, wrk's own CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "30s",
        "-s",
        str(workload.script),
    ]
    command += [url, "--", str(workload.tasks), str(workload.texts), str(texts_per_request), str(seed)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"wrk failed ({proc.returncode}): {proc.stderr.strip()[-500:] or proc.stdout[-500:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    elapsed = result["duration_us"] / 1e6
    ok = result["requests"] - result["status_errors"]
    result["texts_per_s"] = ok * texts_per_request / elapsed
    result["wrk_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["elapsed_s"] = elapsed
    result["p50_ms"], result["p99_ms"] = result["p50_us"] / 1e3, result["p99_us"] / 1e3
    result["errors"] = result["status_errors"] + result["socket_errors"]
    return result
