"""A PostgreSQL DSN fit for logs and error messages: its password replaced by ***, or scrubbed out."""

from __future__ import annotations

import re

import psycopg

_URL_PASSWORD = re.compile(r"(://[^:/@?#]*:)([^@/?#]*)@")  # postgresql://user:PASSWORD@host
_PARAM_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)  # password=...


def redact_dsn(dsn: str) -> str:
    """`dsn` with its password (URL userinfo or a password= parameter) replaced by ***."""
    return _PARAM_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", dsn))


def passwords(dsn: str) -> list[str]:
    """The password of `dsn` (as written and as decoded), to scrub from error messages."""
    secrets = [m.group(2) for m in _URL_PASSWORD.finditer(dsn)]
    secrets += [m.group(2).strip("'") for m in _PARAM_PASSWORD.finditer(dsn)]
    try:
        decoded = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        decoded = None
    if isinstance(decoded, str):
        secrets.append(decoded)
    return sorted({s for s in secrets if s}, key=len, reverse=True)
