"""A throwaway PostgreSQL cluster for tests: `initdb` into a temp directory, served on a free loopback port.

    cluster = PgCluster.create()     # initdb, start, create the database (skips if PostgreSQL is absent)
    cluster.dsn                      # postgresql://recast@127.0.0.1:PORT/recast_test (trust auth)
    cluster.stop(); cluster.start()  # or cluster.restart(): same port, same data
    cluster.destroy()                # stop and remove the directory

initdb refuses to run as root, so as root the cluster belongs to `nobody` (the directory is chowned to it and
initdb/pg_ctl run under its uid). Unix sockets live in the temp directory, never in /var/run/postgresql.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

USER = "recast"
DATABASE = "recast_test"
TIMEOUT = 60  # seconds, for every subprocess
SERVER_OPTIONS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"


def find_bindir() -> Path | None:
    """The directory of initdb, pg_ctl and postgres: from PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    candidates = [Path(os.path.realpath(on_path)).parent] if on_path else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(p) for p in versions), key=lambda p: _version_key(p.parent.name), reverse=True)
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.bindir, self.root, self.port = bindir, root, port
        self.data = root / "data"
        self.log = root / "server.log"
        self.running = False
        # as root, everything runs as nobody (initdb and postgres refuse to run as root)
        self._owner = pwd.getpwnam("nobody") if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    @classmethod
    def create(cls) -> PgCluster:
        bindir = find_bindir()
        if bindir is None:
            pytest.skip(
                "PostgreSQL server binaries not found (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
                "install them with tools/system-deps.sh"
            )
        root = Path(tempfile.mkdtemp(prefix="recast-pg-"))
        cluster = cls(bindir, root, free_port())
        try:
            if cluster._owner is not None:
                os.chown(root, cluster._owner.pw_uid, cluster._owner.pw_gid)
            cluster._run(
                "initdb", "-D", str(cluster.data), "-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C", "-N"
            )
            cluster.start()
            cluster._run("createdb", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", USER, DATABASE)
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {shlex.quote(str(self.root))} {SERVER_OPTIONS}"
        try:
            self._run(
                "pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data), "-l", str(self.log), "-o", options
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- server log ---\n{self.log_tail()}") from None
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", mode, "-D", str(self.data))
        self.running = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        try:
            if self.running:
                try:
                    self.stop()
                except (RuntimeError, subprocess.TimeoutExpired):
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no server log: {exc})"

    def _run(self, program: str, *args: str) -> None:
        command: Sequence[str] = [str(self.bindir / program), *args]
        user = None if self._owner is None else self._owner.pw_uid
        group = None if self._owner is None else self._owner.pw_gid
        result = subprocess.run(
            command,
            cwd=self.root,
            user=user,
            group=group,
            extra_groups=None if self._owner is None else [],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise RuntimeError(f"{shlex.join(command)} failed with exit code {result.returncode}:\n{output}")
