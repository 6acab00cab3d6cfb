"""`recast predict --data FILE --out FILE`: every row of a file through a task, offline or on a server.

Offline (`--task TASK.safetensors --bank BANK_DIR`) runs the task's model on chunks of rows, batched by
length; against a server (`--task-id ID`) chunks are requests of at most the server's `max_inputs` texts,
a few in flight, retried with backoff on 429 and 503 by the client. Either way the input is read a chunk
at a time and each chunk's rows are written, in input order, as soon as it is done. Bad rows are reported
by line number on stderr and in the output's `error` column; the exit code is 1 when any row failed.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from recast_cli.predict_files import (
    Outcome,
    Row,
    RowReader,
    RowWriter,
    chunks,
    count_lines,
    file_format,
)
from recast_core.errors import DataError

OFFLINE_CHUNK = 512  # rows per offline chunk: sorted by length inside it, forwarded in batches of 64
OFFLINE_BATCH = 64
IN_FLIGHT = 4  # predict requests at once against a server
MAX_INPUT_CHARS = 4096  # offline text limit: the server's default RECAST_MAX_INPUT_CHARS
REPORTED_ROWS = 20  # bad rows named on stderr; the output names them all
CLIENT_RETRIES = 8  # 429/503 retries per request (backoff honouring Retry-After, up to 30 s a wait)

Loader = Callable[[argparse.Namespace], tuple[Any, Any]]


class Backend(Protocol):
    """Predicts chunks of rows; `classes` orders every outcome's scores."""

    classes: tuple[str, ...]
    chunk_size: int
    max_chars: int

    def run(self, chunks: Iterable[list[Row]]) -> Iterator[list[Outcome]]:
        """One list of outcomes per chunk, in the chunks' order, each in its rows' order."""
        ...


class OfflineBackend:
    """A task artifact on a bank, in this process."""

    chunk_size = OFFLINE_CHUNK
    max_chars = MAX_INPUT_CHARS

    def __init__(self, backbone: Any, bank: Any, task: Path) -> None:
        from recast_core.artifact import read_artifact
        from recast_core.task_model import TextTaskModel, artifact_spec

        spec = artifact_spec(bank, backbone.hidden_size, None, backbone.embedding_bound())
        self.model = TextTaskModel.from_artifact(backbone, bank, read_artifact(task, spec))
        self.classes = tuple(self.model.labels)

    def run(self, chunks: Iterable[list[Row]]) -> Iterator[list[Outcome]]:
        import torch

        from recast_core.task_model import predictions

        for chunk in chunks:
            good = [row for row in chunk if row.error is None]  # a row without an error has a text
            logits = self.model.logits([str(row.text) for row in good], OFFLINE_BATCH) if good else None
            answers = [] if logits is None else predictions(torch.softmax(logits, dim=-1), self.classes)
            by_line = {
                row.line: Outcome(row, p.label, [p.scores[c] for c in self.classes])
                for row, p in zip(good, answers, strict=True)
            }
            yield [by_line.get(row.line) or Outcome.failed(row, str(row.error)) for row in chunk]


_INPUT_INDEX = re.compile(r"^inputs\[(\d+)\]\s*")


class ServerBackend:
    """A task on a running server, through recast_client: requests sized to its limits, IN_FLIGHT at
    once, in order."""

    def __init__(self, url: str | None, api_key: str | None, task_id: str) -> None:
        from recast_client import Client

        self.client = Client(url, api_key, timeout=120.0, retries=CLIENT_RETRIES, max_backoff=30.0)
        self.task_id = task_id
        try:
            self.classes = tuple(self.client.get_task(task_id)["labels"])
            limits = self.client.predict_limits()
        except BaseException:
            self.client.close()
            raise
        self.chunk_size, self.max_chars = limits["max_inputs"], limits["max_input_chars"]

    def close(self) -> None:
        self.client.close()

    def run(self, chunks: Iterable[list[Row]]) -> Iterator[list[Outcome]]:
        with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="predict") as pool:
            pending: deque[Future[list[Outcome]]] = deque()
            try:
                for chunk in chunks:
                    pending.append(pool.submit(self._chunk, chunk))
                    if len(pending) == IN_FLIGHT:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def _chunk(self, chunk: list[Row]) -> list[Outcome]:
        """One request for the chunk's good rows; a text the server refuses is marked and the rest sent
        again. Fatal errors (unreachable, unauthorized, unknown task) propagate."""
        from recast_client.errors import BadInput, Retryable

        errors: dict[int, str] = {row.line: str(row.error) for row in chunk if row.error is not None}
        good = [row for row in chunk if row.error is None]
        answered: dict[int, Outcome] = {}
        while good:
            try:
                answer = self.client.predict(self.task_id, [str(row.text) for row in good])
            except BadInput as exc:
                match = _INPUT_INDEX.match(exc.message)
                if match is None or int(match.group(1)) >= len(good):
                    errors |= {row.line: f"refused by the server: {exc.message}" for row in good}
                    break
                errors[good.pop(int(match.group(1))).line] = exc.message[match.end() :]
                continue
            except Retryable as exc:  # still overloaded after the client's retries
                errors |= {row.line: f"{exc.error_type} after {CLIENT_RETRIES} retries" for row in good}
                break
            for row, output in zip(good, answer["outputs"], strict=True):
                answered[row.line] = self._outcome(row, output, answer["version"])
            break
        return [answered.get(row.line) or Outcome.failed(row, errors[row.line]) for row in chunk]

    def _outcome(self, row: Row, output: dict[str, Any], version: int) -> Outcome:
        scores = output["scores"]
        if set(scores) != set(self.classes):
            return Outcome.failed(row, f"the task's labels changed (version {version} answered)")
        return Outcome(row, output["label"], [scores[c] for c in self.classes])


def _check_out(out: Path, data: Path | None) -> None:
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: no directory {out.parent}")
    if data is not None and out.exists() and out.resolve() == data.resolve():
        raise DataError(f"--out {out} is the input file")


def predict_file(args: argparse.Namespace, load: Loader) -> int:
    """Run `recast predict --data`: 0 when every row was predicted, 1 when some failed."""
    data: Path | None = None if str(args.data) == "-" else args.data
    if data is None and args.format is None:
        raise DataError("--data - (standard input) needs --format csv or --format jsonl")
    in_kind = file_format(data, args.format, "--data")
    out: Path = args.out
    out_kind = file_format(out, None, "--out")
    _check_out(out, data)
    with RowReader(data, in_kind, args.text_column) as reader:
        total = count_lines(data) - (in_kind == "csv") if data is not None and reader.seekable else None
        if args.task_id is not None:
            server = ServerBackend(args.url, args.api_key, args.task_id)
            try:
                return _stream(reader, server, out, out_kind, total)
            finally:
                server.close()
        backbone, bank = load(args)
        return _stream(reader, OfflineBackend(backbone, bank, args.task), out, out_kind, total)


def _stream(reader: RowReader, backend: Backend, out: Path, kind: str, total: int | None) -> int:
    from tqdm import tqdm

    pieces = chunks(reader.rows(backend.max_chars), backend.chunk_size)
    first = next(pieces, [])
    # JSON Lines rows may carry an id on any line: their CSV always has the column (empty where absent)
    with_id = reader.has_id or reader.kind == "jsonl"
    writer = RowWriter(out, kind, backend.classes, with_id)
    bar = tqdm(total=total, unit="row", desc="predicting", file=sys.stderr, disable=None, dynamic_ncols=True)
    try:
        for outcomes in backend.run(_prepend(first, pieces)):
            writer.write(outcomes)
            bar.update(len(outcomes))
            _report(bar, [o for o in outcomes if o.error is not None], writer.failed)
        bar.total = bar.n  # the line count was an estimate (header, blank lines, multi-line records)
        bar.refresh()
    finally:
        bar.close()
        writer.close()
    if writer.failed:
        print(
            f"recast predict: {writer.failed} of {writer.written} rows failed; {out} holds every row, "
            "the failed ones with their error",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {writer.written} rows to {out}")
    return 0


def _prepend(first: list[Row], rest: Iterator[list[Row]]) -> Iterator[list[Row]]:
    if first:
        yield first
    yield from rest


def _report(bar: Any, failed: Sequence[Outcome], failed_so_far: int) -> None:
    """Name the first REPORTED_ROWS bad rows on stderr, above the progress bar."""
    before = failed_so_far - len(failed)
    for i, outcome in enumerate(failed, start=before):
        if i < REPORTED_ROWS:
            bar.write(f"recast predict: line {outcome.row.line}: {outcome.error}", file=sys.stderr)
        elif i == REPORTED_ROWS:
            bar.write("recast predict: further bad rows are named only in the output", file=sys.stderr)
