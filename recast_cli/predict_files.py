"""The rows of a prediction input file, read one at a time, and the output file, written row by row.

Input: CSV with a header row, or JSON Lines (one object per line), from a path or standard input (`-`).
Each row keeps the line of the input it starts on; a row that cannot be used (malformed CSV or JSON,
missing or empty text, text over the character limit, not valid UTF-8) becomes a row with an `error`,
and reading goes on with the next line. Output: CSV (`line`, `id` when the input is JSON Lines or a CSV
with an `id` column, `label`, one `score_<class>` column per class, `error`) or JSON Lines (`line`, `id`,
then `label` and `scores`, or `error`).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from recast_core.errors import DataError

FORMATS = ("csv", "jsonl")
MAX_RECORD_CHARS = 1 << 20  # a CSV record or JSON line longer than this is a bad row (a runaway quote)
ID_COLUMN = "id"


@dataclass(frozen=True)
class Row:
    """One input row: the line it starts on, its text (None when unusable), its `id` (None when absent)
    and why it cannot be predicted (None when it can)."""

    line: int
    text: str | None
    id: Any = None
    error: str | None = None


@dataclass(frozen=True)
class Outcome:
    """A row's answer: its label and one score per class (in the writer's class order), or an error."""

    row: Row
    label: str | None = None
    scores: Sequence[float] | None = None
    error: str | None = None

    @classmethod
    def failed(cls, row: Row, error: str) -> Outcome:
        return cls(row, error=error)


def file_format(path: Path | None, given: str | None, what: str) -> str:
    """csv or jsonl: `given`, else the path's suffix; a DataError for anything else."""
    if given is not None:
        return given
    suffix = "" if path is None else path.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        name = "standard input" if path is None else str(path)
        raise DataError(f"{what} {name}: cannot tell csv from jsonl by its name; use .csv or .jsonl")
    return suffix


def count_lines(path: Path) -> int:
    """Lines of a regular file (a last line without a newline counts), read in blocks: a cheap total."""
    count, last = 0, b"\n"
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


class _Lines:
    """The lines of a text file for csv.reader, numbered, remembering those of the record being read so
    that a record that fails to parse can be given back after its first line (an unclosed quote must not
    swallow the rows after it). A line or record over MAX_RECORD_CHARS raises _TooLong."""

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh
        self.number = 0  # the line most recently handed out
        self.record: list[str] = []
        self._given_back: deque[str] = deque()
        self._chars = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self._given_back.popleft() if self._given_back else read_line(self.fh)
        if line is None:
            raise StopIteration
        self.number += 1
        self.record.append(line)
        self._chars += len(line)
        if self._chars > MAX_RECORD_CHARS:
            raise _TooLong
        return line

    def begin(self) -> int:
        """Start a record; the number of its first line."""
        self.record, self._chars = [], 0
        return self.number + 1

    def give_back_after_first(self) -> None:
        rest = self.record[1:]
        self._given_back.extendleft(reversed(rest))
        self.number -= len(rest)


class _TooLong(Exception):
    pass


def read_line(fh: IO[str]) -> str | None:
    """The next line (None at the end); one longer than MAX_RECORD_CHARS is read to its end but kept
    only in part, so a file without newlines cannot fill the memory."""
    line = fh.readline(MAX_RECORD_CHARS + 1)
    if not line:
        return None
    if len(line) > MAX_RECORD_CHARS and not line.endswith(("\n", "\r")):
        while (more := fh.readline(MAX_RECORD_CHARS)) and not more.endswith(("\n", "\r")):
            pass
    return line


def text_problem(value: Any, column: str, max_chars: int) -> str | None:
    """Why `value` cannot be predicted as the text of a row (None: it can)."""
    if not isinstance(value, str):
        return f"{column!r} must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"empty text in column {column!r}"
    if len(value) > max_chars:
        return f"text has {len(value)} characters; the limit is {max_chars}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "text is not valid UTF-8 (invalid bytes or a lone surrogate)"
    return None


class RowReader:
    """Rows of a CSV or JSON Lines file (path, or None for standard input), one at a time.

    Opening reads the CSV header: a missing file, an empty CSV or a header without the text column is a
    DataError, before any row is read."""

    def __init__(self, path: Path | None, kind: str, text_column: str = "text") -> None:
        self.path, self.kind, self.text_column = path, kind, text_column
        self.name = "standard input" if path is None else str(path)
        if path is not None and not path.is_file():
            raise DataError(f"{path}: no such file")
        binary = sys.stdin.buffer if path is None else path.open("rb")
        # bytes that are not UTF-8 become lone surrogates: the row is bad, the file is still read
        self._fh = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
        self._lines = _Lines(self._fh)
        self.columns: list[str] = []
        if kind == "csv":
            self._csv = csv.reader(self._lines, strict=True)
            self._open_csv()

    @property
    def seekable(self) -> bool:
        return self.path is not None and self._fh.seekable()

    @property
    def has_id(self) -> bool:
        """The CSV header has an `id` column (JSON Lines: rows carry their own)."""
        return ID_COLUMN in self.columns

    def close(self) -> None:
        if self.path is not None:
            self._fh.close()

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_csv(self) -> None:
        try:
            header = next(self._csv, None)
        except (csv.Error, _TooLong) as exc:
            raise DataError(f"{self.name}: the header row is not valid CSV ({_reason(exc)})") from None
        if not header:
            raise DataError(f"{self.name}: no header row (empty file)")
        self.columns = header
        if self.text_column not in header:
            shown = ", ".join(repr(c) for c in header[:20])
            raise DataError(f"{self.name}: no column {self.text_column!r}; the header has {shown}")

    def rows(self, max_chars: int) -> Iterator[Row]:
        """Every row in input order (blank lines skipped), texts over `max_chars` characters bad."""
        if self.kind == "csv":
            return self._csv_rows(max_chars)
        return self._jsonl_rows(max_chars)

    def _csv_rows(self, max_chars: int) -> Iterator[Row]:
        text_at = self.columns.index(self.text_column)
        id_at = self.columns.index(ID_COLUMN) if self.has_id else None
        width = len(self.columns)
        while True:
            start = self._lines.begin()
            try:
                fields = next(self._csv)
            except StopIteration:
                return
            except (csv.Error, _TooLong) as exc:
                self._lines.give_back_after_first()
                yield Row(start, None, error=f"malformed CSV ({_reason(exc)})")
                continue
            if not fields:
                continue  # a blank line
            row_id = fields[id_at] if id_at is not None and id_at < len(fields) else None
            if len(fields) != width:
                if len(self._lines.record) > 1:  # most likely an unclosed quote: read on after its line
                    self._lines.give_back_after_first()
                problem = f"{len(fields)} fields; the header has {width} (unquoted delimiter or quote?)"
                yield Row(start, None, row_id, problem)
                continue
            text = fields[text_at]
            yield Row(start, text, row_id, text_problem(text, self.text_column, max_chars))

    def _jsonl_rows(self, max_chars: int) -> Iterator[Row]:
        number = 0
        while (line := read_line(self._fh)) is not None:
            number += 1
            if not line.strip():
                continue
            if len(line) > MAX_RECORD_CHARS:
                yield Row(number, None, error=f"line longer than {MAX_RECORD_CHARS} characters")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Row(number, None, error=f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            except RecursionError:
                yield Row(number, None, error="not valid JSON (nested too deeply)")
                continue
            if not isinstance(obj, dict):
                yield Row(number, None, error=f"not a JSON object (a {type(obj).__name__})")
                continue
            row_id = obj.get(ID_COLUMN)
            text = obj.get(self.text_column)
            if text is None:
                problem: str | None = f"no {self.text_column!r} key"
            else:
                problem = text_problem(text, self.text_column, max_chars)
            yield Row(number, text if problem is None else None, row_id, problem)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _TooLong):
        return f"a record longer than {MAX_RECORD_CHARS} characters: an unclosed quote?"
    return str(exc)


def chunks(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    """`rows` in lists of `size` (the last may be shorter), read lazily."""
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _id_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


class RowWriter:
    """Outcomes written to `path` (CSV or JSON Lines) as they come, flushed after each chunk."""

    def __init__(self, path: Path, kind: str, classes: Sequence[str], with_id: bool) -> None:
        self.kind, self.classes, self.with_id = kind, tuple(classes), with_id
        # an id that is not valid UTF-8 is written with backslash escapes rather than failing the run
        self._fh = path.open("w", encoding="utf-8", errors="backslashreplace", newline="")
        self.written = self.failed = 0
        if kind == "csv":
            self._csv = csv.writer(self._fh)
            header = ["line", *([ID_COLUMN] if with_id else []), "label"]
            self._csv.writerow([*header, *(f"score_{c}" for c in self.classes), "error"])

    def write(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self._write(outcome)
            self.written += 1
            self.failed += outcome.error is not None
        self._fh.flush()

    def _write(self, outcome: Outcome) -> None:
        row = outcome.row
        if self.kind == "csv":
            scores = outcome.scores if outcome.scores is not None else [""] * len(self.classes)
            head = [row.line, *([_id_text(row.id)] if self.with_id else []), outcome.label or ""]
            self._csv.writerow([*head, *scores, outcome.error or ""])
            return
        record: dict[str, Any] = {"line": row.line}
        if row.id is not None:
            record[ID_COLUMN] = row.id
        if outcome.error is not None:
            record["error"] = outcome.error
        else:
            assert outcome.scores is not None
            record["label"] = outcome.label
            record["scores"] = dict(zip(self.classes, outcome.scores, strict=True))
        self._fh.write(json.dumps(record) + "\n")  # ASCII: a lone surrogate in an id stays an escape

    def close(self) -> None:
        self._fh.close()
