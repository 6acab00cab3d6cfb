"""The task table's summary columns: what start-up reads of each PostgreSQL row instead of its artifact.

    summary_format     smallint  NULL: not summarized yet (a row written before these columns existed,
                                 filled from its data by the next `read_index`); 1: summarized; 0: the data
                                 is no readable artifact (unreadable_reason says why)
    digest             bytea     sha256 of the artifact bytes
    size_bytes         integer
    coefficients       bytea     (num_slots, num_templates) float32, little-endian
    num_slots, num_templates, hidden_size integer; head_parameters bigint
    labels             text      JSON list
    created, bank_fingerprint, unreadable_reason text

A put writes them with the data, in the same statement; a delete sets them NULL with the data.
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg import sql

from server.ids import is_stored_id
from server.stores.index import LIVE, TOMBSTONE, UNREADABLE, IndexRow, Summary, row_of

log = logging.getLogger(__name__)

COLUMNS = (
    ("summary_format", "smallint"),
    ("digest", "bytea"),
    ("size_bytes", "integer"),
    ("coefficients", "bytea"),
    ("num_slots", "integer"),
    ("num_templates", "integer"),
    ("hidden_size", "integer"),
    ("head_parameters", "bigint"),
    ("labels", "text"),
    ("created", "text"),
    ("bank_fingerprint", "text"),
    ("unreadable_reason", "text"),
)
NAMES = tuple(name for name, _ in COLUMNS)
SUMMARIZED, UNSUMMARIZABLE = 1, 0

# `col = %(col)s, ...` and `col = excluded.col, ...`, for the put and delete statements
ASSIGN = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(n), sql.Placeholder(n)) for n in NAMES)
ASSIGN_EXCLUDED = sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(sql.Identifier(n)) for n in NAMES)
INSERT_NAMES = sql.SQL(", ").join(sql.Identifier(n) for n in NAMES)
INSERT_VALUES = sql.SQL(", ").join(sql.Placeholder(n) for n in NAMES)


def add_columns(table: sql.Identifier) -> sql.Composed:
    """Adds the summary columns a table of an earlier version lacks."""
    additions = sql.SQL(", ").join(
        sql.SQL("ADD COLUMN IF NOT EXISTS {} {}").format(sql.Identifier(name), sql.SQL(kind))
        for name, kind in COLUMNS
    )
    return sql.SQL("ALTER TABLE {} {}").format(table, additions)


def select(table: sql.Identifier) -> sql.Composed:
    """Every row's summary columns; the data only of rows that have no summary yet."""
    return sql.SQL(
        "SELECT task_id, version, updated, data IS NULL, {}, "
        "CASE WHEN data IS NOT NULL AND summary_format IS NULL THEN data END FROM {}"
    ).format(INSERT_NAMES, table)


def backfill(table: sql.Identifier) -> sql.Composed:
    """Fill the summary columns of a row still at the version summarized and still without them."""
    return sql.SQL(
        "UPDATE {} SET {} WHERE task_id = %(task_id)s AND version = %(version)s AND summary_format IS NULL"
    ).format(table, ASSIGN)


def params(data: bytes | None, summary: Summary | None) -> dict[str, Any]:
    """The summary columns of a put of `data` (summarized here when `summary` is None) or of a delete."""
    if data is None:
        return dict.fromkeys(NAMES)
    row = IndexRow("", 0, "", LIVE, summary) if summary is not None else row_of("", 0, "", data)
    return row_params(row)


def row_params(row: IndexRow) -> dict[str, Any]:
    values: dict[str, Any] = dict.fromkeys(NAMES)
    s = row.summary
    if s is None:
        values |= {"summary_format": UNSUMMARIZABLE, "digest": row.digest, "size_bytes": row.size}
        values["unreadable_reason"] = row.reason
        return values
    return values | {
        "summary_format": SUMMARIZED,
        "digest": s.digest,
        "size_bytes": s.size,
        "coefficients": s.coefficients,
        "num_slots": s.shape[0],
        "num_templates": s.shape[1],
        "hidden_size": s.hidden_size,
        "head_parameters": s.head_parameters,
        "labels": s.labels,
        "created": s.created,
        "bank_fingerprint": s.bank_fingerprint,
    }


def row_from(record: tuple[Any, ...], updated: str) -> tuple[IndexRow, bool]:
    """(the index row of one SELECT record, whether its summary columns must be filled from its data)."""
    task_id, version, _, deleted, fmt, digest, size, coefficients, slots, templates = record[:10]
    hidden, head, labels, created, fingerprint, reason, data = record[10:]
    if deleted:
        return IndexRow(task_id, version, updated, TOMBSTONE), False
    if fmt == SUMMARIZED:
        summary = Summary(
            bytes(digest),
            size,
            (slots, templates),
            bytes(coefficients),
            hidden,
            head,
            fingerprint,
            created,
            labels,
        )
        return IndexRow(task_id, version, updated, LIVE, summary), False
    if fmt == UNSUMMARIZABLE:
        return IndexRow(
            task_id, version, updated, UNREADABLE, digest=bytes(digest), size=size, reason=reason
        ), False
    return row_of(task_id, version, updated, bytes(data)), True


class InvalidIds:
    """Rows of a scan whose task_id is not a valid stored id: skipped, counted, reported once per scan."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def invalid(self, task_id: str) -> bool:
        if is_stored_id(task_id):
            return False
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(task_id[:200])
        return True

    def report(self, table: str) -> None:
        if self.count:
            log.warning(
                "skipped task table rows whose task_id is not a valid task id",
                extra={"table": table, "rows": self.count, "examples": self.examples},
            )
