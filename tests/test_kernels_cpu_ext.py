"""The compiled CPU kernel's build cache: portable targets (RECAST_EXT_ARCH), finished builds loaded as is."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import cpu_ext

ROOT = Path(__file__).resolve().parent.parent


def test_arch_flags_default_to_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECAST_EXT_ARCH", raising=False)
    assert cpu_ext.arch_flags() == ["-march=native"]
    monkeypatch.setenv("RECAST_EXT_ARCH", "  ")
    assert cpu_ext.arch_flags() == ["-march=native"]
    monkeypatch.setenv("RECAST_EXT_ARCH", "-mavx2 -mfma")
    assert cpu_ext.arch_flags() == ["-mavx2", "-mfma"]


def test_portable_key_ignores_this_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECAST_EXT_DIR", str(tmp_path))
    keys = {}
    for cpu in (b"flags: fpu sse2 avx2 fma", b"flags: fpu sse2"):
        monkeypatch.setattr(cpu_ext, "_cpu_flags", lambda cpu=cpu: cpu)
        monkeypatch.delenv("RECAST_EXT_ARCH", raising=False)
        native = cpu_ext.build_dir()
        monkeypatch.setenv("RECAST_EXT_ARCH", "-mavx2 -mfma")
        keys[cpu] = (native, cpu_ext.build_dir())
    (native_a, portable_a), (native_b, portable_b) = keys.values()
    assert native_a != native_b  # a native build belongs to one CPU
    assert portable_a == portable_b  # a portable build is found on any CPU
    assert portable_a != native_a and portable_a.parent == tmp_path
    monkeypatch.setenv("RECAST_EXT_ARCH", "-march=x86-64-v3")
    assert cpu_ext.build_dir() != portable_a  # another target, another build


def test_unloadable_build_is_rebuilt_not_served(tmp_path: Path) -> None:
    assert cpu_ext._import_built(tmp_path / "missing.so") is None
    broken = tmp_path / "recast_segmented_linear.so"
    broken.write_bytes(b"\x7fELF cut short")
    assert cpu_ext._import_built(broken) is None


def test_finished_build_loads_without_a_compiler(tmp_path: Path) -> None:
    """What a container image does: a fresh process, the build of its builder stage, and no compiler."""
    built = cpu_ext.load()  # this machine's build (cached on disk; the server tests build it too)
    if built is None or built.__file__ is None:
        pytest.skip(f"no compiled CPU kernel on this machine: {cpu_ext.unavailable_reason()}")
    env = {"RECAST_EXT_DIR": str(tmp_path / "ext"), "RECAST_EXT_ARCH": "-mavx2 -mfma"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        target = cpu_ext.build_dir()
    target.mkdir(parents=True)
    shutil.copy(built.__file__, target / "recast_segmented_linear.so")
    empty = tmp_path / "bin"  # PATH without c++, g++ or ninja
    empty.mkdir()
    script = "from kernels import cpu_ext as c; m = c.load(); print(m and m.__file__, c.unavailable_reason())"
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env | {"PATH": str(empty), "HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.split() == [str(target / "recast_segmented_linear.so"), "None"], result.stderr
    assert sorted(p.name for p in target.iterdir()) == ["recast_segmented_linear.so"]  # nothing written


PORTABLE_SCRIPT = """
import json, torch
from kernels import cpu_ext, reference, segments_of
from kernels.torch_path import TorchPath
assert cpu_ext.load() is not None, cpu_ext.unavailable_reason()
gen = torch.Generator().manual_seed(3)
x, slot = torch.randn(130, 384, generator=gen), torch.randint(0, 5, (130,), generator=gen)
templates, coeffs = torch.randn(2, 1536, 384, generator=gen) / 20, torch.randn(5, 2, generator=gen)
want = reference.segmented_template_linear(x, slot, templates, coeffs, None)
errors = {}
for variant in ("brgemm", "microkernel"):
    got = TorchPath(None, variant=variant).linear(x, segments_of(slot), templates, coeffs, None)
    errors[variant] = float((got - want).norm() / want.norm())
print(json.dumps(errors))
"""


def test_portable_avx2_build_compiles_and_matches_reference(tmp_path: Path) -> None:
    """The images' portable target (AVX2/FMA) builds on any x86-64 compiler host and its fused variants
    agree with the reference: AVX-512 code paths must carry their own target attributes, so the build does
    not depend on the build machine's CPU (an AVX-512 host must not hide an AVX2 host's failure)."""
    env = os.environ | {
        "RECAST_EXT_DIR": str(tmp_path / "ext"),
        "RECAST_EXT_ARCH": "-mavx2 -mfma",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", PORTABLE_SCRIPT], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(errors) == {"brgemm", "microkernel"} and max(errors.values()) < 1e-5, errors
