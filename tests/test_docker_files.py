"""The container images and the compose file, checked statically: no Docker engine is needed.

Every path a Dockerfile copies must exist and be in the build context, every command it runs must be a
real one (the `recast` verbs and options through the CLI's own parser), the image must run as a non-root
user without build tools, and hadolint and the Compose specification's schema must accept the files.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_files import (
    ROOT,
    Dockerfile,
    dockerignore_excludes,
    exec_form,
    parse_dockerfile,
    run_tool,
    setting_env_names,
    shell_commands,
)

from recast_cli.main import build_parser
from server.api.routes.ops import router

DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
COMPOSE = ROOT / "docker" / "compose.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILD_TOOLS = {"g++", "gcc", "clang", "make", "build-essential", "cmake", "ninja-build"}
# commands the RUN lines may use; each one is checked further below where it matters
KNOWN_COMMANDS = {
    "apt-get",
    "rm",
    "groupadd",
    "useradd",
    "mkdir",
    "chown",
    "pip",
    "python",
    "python3.11",
    "recast",
}


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return parse_dockerfile(DOCKERFILES[request.param])


def _pin(package: str) -> str:
    pins = [str(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith(f"{package}==")]
    assert len(pins) == 1, f"pyproject.toml must pin {package} exactly once"
    return pins[0].split("==", 1)[1]


def test_hadolint_accepts_both_dockerfiles() -> None:
    result = run_tool("hadolint", "--config", ".hadolint.yaml", *(str(p) for p in DOCKERFILES.values()))
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_and_base_images(dockerfile: Dockerfile) -> None:
    names = [stage.name for stage in dockerfile.stages]
    assert names == ["builder", "bank-build", "bank", None], names
    for stage in dockerfile.stages:
        base = stage.base
        assert base in names or base == "scratch" or re.fullmatch(r"[\w./-]+:[\w.-]+", base), base
        assert not base.endswith(":latest"), base
    runtime_base = dockerfile.final.base
    assert runtime_base == dockerfile.stage("builder").base  # same OS and Python as the venv was built on
    if dockerfile.path.name == "Dockerfile":
        assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu22\.04", runtime_base), runtime_base
    else:
        assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", runtime_base), runtime_base
    assert PYPROJECT["project"]["requires-python"].startswith(">=3.11,<3.12")


def test_torch_is_the_pinned_version_from_the_right_wheel_index(dockerfile: Dockerfile) -> None:
    args = dockerfile.stage("builder").args()
    assert args["TORCH_VERSION"] == _pin("torch")
    index = args["TORCH_INDEX_URL"]
    if dockerfile.path.name == "Dockerfile":
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
    else:
        assert index == "https://download.pytorch.org/whl/cpu"
    installs = [
        argv
        for run in dockerfile.stage("builder").all("RUN")
        for argv in shell_commands(run.args, args)
        if argv[:2] == ["pip", "install"] and any(a.startswith("torch==") for a in argv)
    ]
    assert installs == [["pip", "install", f"torch=={_pin('torch')}", "--index-url", index]]


# the triton each CUDA build of torch requires (its wheel's Requires-Dist: triton==...; PyTorch's release
# notes pin the same); a torch upgrade must add its pair here, so the pair the image ships stays checked
TRITON_OF_CUDA_TORCH = {"2.13.0": "3.7.1"}


def _extra_pin(extra: str, package: str) -> str:
    pins = [d for d in PYPROJECT["project"]["optional-dependencies"][extra] if d.startswith(f"{package}==")]
    assert len(pins) == 1, f"pyproject.toml's [{extra}] extra must pin {package} exactly once"
    return str(pins[0]).split("==", 1)[1]


def test_the_gpu_image_ships_the_triton_its_torch_requires_and_the_tests_use() -> None:
    gpu = parse_dockerfile(DOCKERFILES["gpu"])
    args = gpu.stage("builder").args()
    torch_version, triton_version = args["TORCH_VERSION"], args["TRITON_VERSION"]
    assert torch_version == _pin("torch")
    assert triton_version == TRITON_OF_CUDA_TORCH[torch_version], "CUDA torch needs another triton"
    assert triton_version == _extra_pin("triton", "triton"), "the tests run another triton than ships"
    commands = [argv for run in gpu.stage("builder").all("RUN") for argv in shell_commands(run.args, args)]
    assert ["pip", "install", f"triton=={triton_version}"] in commands
    assert ["pip", "install", "/src[triton]"] in commands
    cpu = parse_dockerfile(DOCKERFILES["cpu"])
    cpu_commands = [argv for run in cpu.stage("builder").all("RUN") for argv in shell_commands(run.args, {})]
    assert not any("triton" in " ".join(argv) for argv in cpu_commands), "the CPU image needs no triton"


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile: Dockerfile) -> None:
    ignore = (ROOT / ".dockerignore").read_text()
    seen_stages: list[str] = []
    for stage in dockerfile.stages:
        for copy in stage.all("COPY"):
            parts = copy.args.split()
            if parts[0].startswith("--from="):
                assert parts[0].removeprefix("--from=") in seen_stages, f"line {copy.line}: unknown stage"
                continue
            assert not parts[0].startswith("--"), f"line {copy.line}: unexpected COPY flag {parts[0]}"
            for source in parts[:-1]:
                assert (ROOT / source).exists(), (
                    f"{dockerfile.path.name}:{copy.line}: no {source} in the repo"
                )
                assert not dockerignore_excludes(ignore, source), f"{source} is excluded by .dockerignore"
                if (ROOT / source).is_dir():
                    for path in (ROOT / source).rglob("*.py"):
                        relative = path.relative_to(ROOT).as_posix()
                        assert not dockerignore_excludes(ignore, relative), relative
        if stage.name:
            seen_stages.append(stage.name)


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignore = (ROOT / ".dockerignore").read_text()
    for path in (
        ".git/config",
        ".venv/bin/python",
        ".cache/banks/x/bank.safetensors",
        "tests/conftest.py",
        "server/__pycache__/app.cpython-311.pyc",
        "docker/.env",
        ".env",
        "deploy/base/deployment.yaml",
    ):
        assert dockerignore_excludes(ignore, path), path
    for path in (
        "pyproject.toml",
        "server/app.py",
        "kernels/csrc/segmented_linear.cpp",
        "recast_core/assets/sentences.txt",
        "docker/healthcheck.py",
    ):
        assert not dockerignore_excludes(ignore, path), path


def _check_python_code(code: str) -> None:
    """`python -c CODE`: it compiles, and every `from M import N` and `N.attr` it uses exists."""
    tree = ast.parse(code)
    imported: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module is not None
            module = importlib.import_module(node.module)
            for alias in node.names:  # a name in the module, or a submodule
                found = getattr(module, alias.name, None)
                if found is None:
                    found = importlib.import_module(f"{node.module}.{alias.name}")
                imported[alias.asname or alias.name] = found
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported:
            assert hasattr(imported[node.value.id], node.attr), f"{node.value.id}.{node.attr} does not exist"


def _check_recast(argv: list[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's answer to an unknown verb or option
        raise AssertionError(f"`recast {' '.join(argv)}` is not a valid command") from exc


def test_run_commands_are_real(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        values = dockerfile.global_args | stage.args()
        workdir = "/"
        for instruction in stage.instructions:
            if instruction.keyword == "WORKDIR":
                workdir = instruction.args
            if instruction.keyword != "RUN":
                continue
            for argv in shell_commands(instruction.args, values):
                where = f"{dockerfile.path.name}:{instruction.line}"
                assert argv[0] in KNOWN_COMMANDS, f"{where}: unexpected command {argv[0]}"
                if argv[0] == "recast":
                    _check_recast(argv[1:])
                elif argv[0] in ("python", "python3.11") and argv[1] == "-c":
                    _check_python_code(argv[2])
                elif argv[0] in ("python", "python3.11"):
                    assert argv[1:3] == ["-m", "venv"], f"{where}: {argv}"
                elif argv[:2] == ["pip", "install"] and argv[2].startswith("/"):
                    # the project itself (with extras of pyproject.toml): a directory holding pyproject.toml
                    target, _, extras = argv[2].partition("[")
                    assert target == workdir, f"{where}: pip install {argv[2]} outside WORKDIR {workdir}"
                    optional = PYPROJECT["project"]["optional-dependencies"]
                    assert all(e in optional for e in extras.rstrip("]").split(",") if e), where
                    assert any("pyproject.toml" in c.args for c in stage.all("COPY")), where


def test_project_install_copies_every_package(dockerfile: Dockerfile) -> None:
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {c.args.split()[0].rstrip("/") for c in dockerfile.stage("builder").all("COPY")}
    assert {p.rstrip("*") for p in packages} <= copied, copied
    assert {"pyproject.toml", "README.md"} <= {
        part for c in dockerfile.stage("builder").all("COPY") for part in c.args.split()[:-1]
    }


def test_bank_is_baked_where_the_server_looks(dockerfile: Dockerfile) -> None:
    (mimic,) = [
        argv
        for run in dockerfile.stage("bank-build").all("RUN")
        for argv in shell_commands(run.args, {})
        if argv[:2] == ["recast", "mimic"]
    ]
    out = mimic[mimic.index("--out") + 1]
    (bank_copy,) = dockerfile.stage("bank").all("COPY")
    assert bank_copy.args.split() == ["--from=bank-build", f"{out}/", "/"]
    env = dockerfile.final.env()
    final_copies = [c.args.split() for c in dockerfile.final.all("COPY")]
    assert ["--from=bank", "/", env["RECAST_BANK"] + "/"] in final_copies


def test_compiled_kernel_is_built_for_the_target_the_runtime_looks_for(dockerfile: Dockerfile) -> None:
    """kernels/cpu_ext.py keys its build by RECAST_EXT_ARCH: the builder and the runtime must agree."""
    builder, final = dockerfile.stage("builder").env(), dockerfile.final.env()
    assert builder["RECAST_EXT_ARCH"] == final["RECAST_EXT_ARCH"]
    assert "native" not in final["RECAST_EXT_ARCH"]  # a portable target, not the build machine's CPU
    assert builder["RECAST_EXT_DIR"] == final["RECAST_EXT_DIR"]
    final_copies = [c.args.split() for c in dockerfile.final.all("COPY")]
    assert ["--from=builder", builder["RECAST_EXT_DIR"], final["RECAST_EXT_DIR"]] in final_copies


def test_runtime_image_is_non_root_without_build_tools(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    for run in final.all("RUN"):
        for argv in shell_commands(run.args, {}):
            if argv[:2] == ["apt-get", "install"]:
                packages = {a for a in argv[2:] if not a.startswith("-")}
                assert not packages & BUILD_TOOLS, packages
                assert not any(p.endswith("-dev") for p in packages), packages
    (user,) = final.all("USER")
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, "a numeric, non-root USER (Kubernetes' runAsNonRoot checks it)"


def test_runtime_settings_entrypoint_port_and_healthcheck(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    env = final.env()
    recast_env = {k for k in env if k.startswith("RECAST_")}
    assert recast_env <= setting_env_names(), recast_env - setting_env_names()
    assert env["RECAST_HOST"] == "0.0.0.0"
    assert "RECAST_API_KEYS" not in env  # no key baked into an image
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    (expose,) = final.all("EXPOSE")
    assert expose.args == env["RECAST_PORT"]
    (entrypoint,) = final.all("ENTRYPOINT")
    argv = exec_form(entrypoint.args)
    assert argv == ["recast", "serve"]
    _check_recast(argv[1:])
    (healthcheck,) = final.all("HEALTHCHECK")
    options, _, command = healthcheck.args.partition("CMD")
    assert "--start-period=" in options and "--timeout=" in options
    python, script = exec_form(command.strip())
    assert python == "python"
    copies = {c.args.split()[-1]: c.args.split()[0] for c in final.all("COPY")}
    source = ROOT / copies[script]
    assert source.is_file() and "/readyz" in source.read_text()
    assert "/readyz" in {getattr(route, "path", None) for route in router.routes}


def test_healthcheck_script_fails_when_nothing_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    healthcheck = _load_healthcheck()
    monkeypatch.setenv("RECAST_PORT", "1")  # nothing listens on port 1
    assert healthcheck.main() == 1


def _load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "docker" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- compose -------------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    result = run_tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_are_wired_safely() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:1[56][\w.-]*", postgres["image"]), postgres["image"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    assert "ports" not in postgres  # the database is reachable from the server only
    volumes = set(compose["volumes"])
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source in volumes, f"{name}: {source} is not a named volume"
        if name == "postgres":
            continue
        build = service["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).is_file()
        assert not service["image"].endswith(":latest") and ":" in service["image"]
        for dependency, condition in service["depends_on"].items():
            assert condition == {"condition": "service_healthy"}
            assert "healthcheck" in services[dependency]
        assert service["healthcheck"]["test"] == ["CMD", "python", "/opt/recast/healthcheck.py"]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        env = service["environment"]
        assert set(env) <= setting_env_names(), set(env) - setting_env_names()
        assert env["RECAST_STORE"].startswith("postgresql://") and "@postgres:5432/" in env["RECAST_STORE"]
        # secrets come from the caller's environment, compose refuses to start without them
        assert "${POSTGRES_PASSWORD:?" in env["RECAST_STORE"]
        assert env["RECAST_API_KEYS"].startswith("${RECAST_API_KEYS:?")
    gpu = services["recast-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert Path(services["recast"]["build"]["dockerfile"]).name == "Dockerfile.cpu"
    assert Path(gpu["build"]["dockerfile"]).name == "Dockerfile"
    assert compose["secrets"]["postgres_password"] == {"environment": "POSTGRES_PASSWORD"}
