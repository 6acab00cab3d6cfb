"""Readers of the deployment files (Dockerfiles, .dockerignore, kustomize output); the tools that check them.

The tools (kubectl for `kubectl kustomize`, hadolint, yamllint, check-jsonschema) come from pinned wheels of
the `dev` extra and sit next to the interpreter; nothing here reaches the network.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# RECAST_* variables read outside server.settings: the compiled CPU kernel's cache (kernels/cpu_ext.py)
KERNEL_ENV = {"RECAST_EXT_DIR", "RECAST_EXT_ARCH"}


def tool(name: str) -> str:
    """The path of a command-line tool installed with the dev extra (next to this interpreter)."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is missing: install the dev extra (python tools/install.py dev)")
    return found


def run_tool(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool(name), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def setting_env_names() -> set[str]:
    """Every RECAST_* variable the server reads (server.settings.Settings) or the kernels read."""
    return {f"RECAST_{name.upper()}" for name in Settings.model_fields} | KERNEL_ENV


def render(overlay: str | Path) -> list[dict[str, Any]]:
    """`kubectl kustomize OVERLAY`, parsed: the objects the overlay would apply."""
    result = run_tool("kubectl", "kustomize", str(overlay))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# --- Dockerfiles ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined, comments inside removed
    line: int  # first line in the file


@dataclass
class Stage:
    base: str  # the image (global ARGs substituted) or an earlier stage's name
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for item in shlex.split(instruction.args):
                key, sep, value = item.partition("=")
                assert sep, f"line {instruction.line}: ENV in the KEY=VALUE form please, got {item!r}"
                values[key] = value
        return values

    def args(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ARG"):
            key, _, value = instruction.args.partition("=")
            values[key.strip()] = value.strip()
        return values


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def instructions(text: str) -> list[Instruction]:
    """Docker's line rules: `\\` continues a line; comment lines (also inside a continuation) are dropped."""
    result: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        continued = line.endswith("\\")
        pending.append(line[:-1].strip() if continued else line)
        if not continued:
            joined = " ".join(pending)
            keyword, _, args = joined.partition(" ")
            result.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, "the file ends inside a continued line"
    return result


def substitute(text: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions(path.read_text()):
        if instruction.keyword == "FROM":
            parts = instruction.args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(substitute(parts[0], global_args), name))
        elif not stages:
            assert instruction.keyword == "ARG", f"{path}:{instruction.line}: only ARG may precede FROM"
            key, _, value = instruction.args.partition("=")
            global_args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(path, global_args, stages)


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD; the shell form is not used here."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def shell_commands(run_args: str, values: dict[str, str]) -> list[list[str]]:
    """A RUN line split at `&&` into argument lists, with ${ARG}s substituted."""
    return [shlex.split(substitute(part, values)) for part in run_args.split("&&") if part.strip()]


# --- .dockerignore -------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def dockerignore_excludes(patterns_text: str, path: str) -> bool:
    """Whether Docker leaves `path` (relative to the context) out of the build context.

    As Docker does: the last pattern matching the path or one of its parent directories decides, and a
    pattern starting with `!` lets it back in."""
    excluded = False
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for raw in patterns_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        regex = _pattern_regex(pattern.strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded
