"""API keys: stored hashed, each scoped to a tenant and a role, with its own rate limit.

Keys come from two places:
- `RECAST_API_KEYS`: plain keys, each an admin key of the default tenant (hashed when read; the plain text
  is kept nowhere else in memory);
- `RECAST_KEYS_FILE`: a JSON file of hashed keys, written by `recast keys create|revoke`:

      {"keys": [{"id": "team-a-admin", "tenant": "team-a", "role": "admin",
                 "sha256": "<hex digest of the key>", "rate_per_s": 20.0, "burst": 40}]}

  `rate_per_s` and `burst` are optional (the server's defaults apply). The server re-reads the file when
  it changes, so keys can be added and revoked without a restart.

Keys are random 256-bit tokens, so one SHA-256 (not a slow password hash) is enough to make a leaked file
useless; looking a digest up in a dict reveals nothing about keys an attacker does not already hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from recast_core.files import write_atomic
from server.ids import DEFAULT_TENANT, TENANT

log = logging.getLogger("server.keys")  # the logger name of its lines as they always were

Role = Literal["admin", "predict"]
ROLES: tuple[Role, ...] = ("admin", "predict")
KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEY_PREFIX = "rk_"


class KeysFileError(ValueError):
    """The keys file is missing, unreadable or malformed; the message names the file and the problem."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    role: Role
    sha256: str
    rate_per_s: float | None = None
    burst: int | None = None

    @classmethod
    def parse(cls, raw: Any, where: str) -> KeyRecord:
        if not isinstance(raw, dict):
            raise KeysFileError(f"{where}: each key is an object")
        unknown = set(raw) - {"id", "tenant", "role", "sha256", "rate_per_s", "burst"}
        if unknown:
            raise KeysFileError(f"{where}: unknown fields {sorted(unknown)}")
        key_id, tenant, role, digest = (raw.get(f) for f in ("id", "tenant", "role", "sha256"))
        if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
            raise KeysFileError(f"{where}: id must match {KEY_ID.pattern}, got {key_id!r}")
        if not isinstance(tenant, str) or not TENANT.fullmatch(tenant):
            raise KeysFileError(f"{where}: key {key_id}: tenant must match {TENANT.pattern}, got {tenant!r}")
        if role not in ROLES:
            raise KeysFileError(f"{where}: key {key_id}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise KeysFileError(f"{where}: key {key_id}: sha256 must be 64 lowercase hex digits")
        rate, burst = raw.get("rate_per_s"), raw.get("burst")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0):
            raise KeysFileError(f"{where}: key {key_id}: rate_per_s must be a positive number")
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
            raise KeysFileError(f"{where}: key {key_id}: burst must be a positive integer")
        return cls(key_id, tenant, role, digest, None if rate is None else float(rate), burst)


def read_keys_file(path: Path) -> list[KeyRecord]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeysFileError(f"keys file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"cannot read keys file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise KeysFileError(f"keys file {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), list):
        raise KeysFileError(f'keys file {path} must hold {{"keys": [...]}}')
    records = [KeyRecord.parse(item, f"{path} keys[{i}]") for i, item in enumerate(raw["keys"])]
    for field in ("id", "sha256"):
        values = [getattr(r, field) for r in records]
        duplicated = sorted({v for v in values if values.count(v) > 1})
        if duplicated:
            raise KeysFileError(f"keys file {path}: duplicate {field} {duplicated[0][:16]}")
    return records


def write_keys_file(path: Path, records: list[KeyRecord]) -> None:
    """Replace the file atomically (temp file, fsync, rename), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(
        {"keys": [{k: v for k, v in asdict(r).items() if v is not None} for r in records]}, indent=2
    )
    write_atomic(path, (body + "\n").encode())


def create_key(
    path: Path,
    tenant: str,
    role: Role,
    key_id: str | None = None,
    rate_per_s: float | None = None,
    burst: int | None = None,
) -> tuple[str, KeyRecord]:
    """Add a new random key to the file (created if missing); returns the plain key, shown once."""
    if not TENANT.fullmatch(tenant):
        raise KeysFileError(f"tenant must match {TENANT.pattern}, got {tenant!r}")
    records = read_keys_file(path) if path.exists() else []
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = key_id or f"{tenant}-{role}-{secrets.token_hex(3)}"
    record = KeyRecord.parse(
        {
            "id": key_id,
            "tenant": tenant,
            "role": role,
            "sha256": hash_key(key),
            **({} if rate_per_s is None else {"rate_per_s": rate_per_s}),
            **({} if burst is None else {"burst": burst}),
        },
        "new key",
    )
    if any(r.id == record.id for r in records):
        raise KeysFileError(f"keys file {path} already has a key {record.id!r}")
    write_keys_file(path, [*records, record])
    return key, record


def revoke_key(path: Path, key_id: str) -> KeyRecord:
    records = read_keys_file(path)
    kept = [r for r in records if r.id != key_id]
    if len(kept) == len(records):
        raise KeysFileError(f"keys file {path} has no key {key_id!r}")
    write_keys_file(path, kept)
    return next(r for r in records if r.id == key_id)


class KeyRing:
    """Hashed keys by digest: the env keys plus the keys file, re-read (at most once a second) on change."""

    def __init__(self, env_keys: tuple[str, ...] = (), keys_file: Path | None = None) -> None:
        self.keys_file = keys_file
        self._env = [
            KeyRecord(f"env-{i + 1}", DEFAULT_TENANT, "admin", hash_key(key))
            for i, key in enumerate(env_keys)
        ]
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._by_digest: dict[str, KeyRecord] = {}
        self._install(read_keys_file(keys_file) if keys_file is not None else [])
        if keys_file is not None:
            self._stamp = self._file_stamp()

    @property
    def enabled(self) -> bool:
        """Whether any key was ever configured (an empty keys file still turns authentication on)."""
        return bool(self._env) or self.keys_file is not None

    def lookup(self, key: str) -> KeyRecord | None:
        self._refresh()
        return self._by_digest.get(hash_key(key))

    def _install(self, records: list[KeyRecord]) -> None:
        by_digest = {r.sha256: r for r in self._env}
        by_digest.update({r.sha256: r for r in records})
        self._by_digest = by_digest

    def _file_stamp(self) -> tuple[int, int] | None:
        assert self.keys_file is not None
        try:
            st = self.keys_file.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.keys_file is None or now - self._checked < 1.0:
            return
        with self._lock:
            if now - self._checked < 1.0:
                return
            self._checked = now
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            self._stamp = stamp  # a bad version is reported once, not every second
            try:
                records = read_keys_file(self.keys_file)
            except KeysFileError as exc:  # keep serving with the keys we have
                log.warning("keys file not reloaded", extra={"reason": str(exc)})
                return
            self._install(records)
            log.info("keys file reloaded", extra={"keys": len(self._by_digest)})
