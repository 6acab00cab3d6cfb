"""The `recast` command line: every subcommand's options and the function that runs it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from recast_cli import commands
from recast_cli.predict_files import FORMATS as FILE_FORMATS
from recast_core.train_options import CAPACITIES, POOLINGS, TrainOptions

DESCRIPTION = "`recast`: build template banks, train and inspect task artifacts, predict offline."

TRAIN_DEFAULTS = TrainOptions()


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _server_options(p: argparse.ArgumentParser, url_default: str | None = "") -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("RECAST_URL") or url_default or None,
        help="server URL (RECAST_URL; default http://127.0.0.1:8000)",
    )
    p.add_argument("--api-key", default=os.environ.get("RECAST_API_KEY"), help="API key (RECAST_API_KEY)")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _backbone_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        type=Path,
        default=Path(os.environ["RECAST_BACKBONE"]) if os.environ.get("RECAST_BACKBONE") else None,
        help="a local Hugging Face encoder directory (RECAST_BACKBONE; default: the bundled MiniLM)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recast", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mimic", help="fit a template bank to the backbone (Neural Mimicry)")
    p.add_argument("--out", type=Path, required=True, help="bank directory to write")
    _backbone_option(p)
    p.add_argument(
        "--groups",
        type=_positive,
        help="layer groups (default: 3 for the bundled MiniLM, else layers / templates rounded up: exact)",
    )
    p.add_argument("--templates", type=_positive, default=2)
    p.add_argument("--coeff-sets", type=_positive, default=2)
    p.add_argument("--method", choices=("svd", "paper"), default="svd")
    p.add_argument("--iterations", type=_positive, default=1000, help="paper method only")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.run_mimic)

    p = sub.add_parser("train", help="train a task (coefficients + head) on labelled data")
    p.add_argument("--bank", type=Path, required=True)
    _backbone_option(p)
    p.add_argument("--data", type=Path, required=True, help=".csv with a header row, or .jsonl")
    p.add_argument("--val-data", type=Path, help="validation data (default: carved from --data)")
    p.add_argument("--test-data", type=Path, help="test data, evaluated once at the end")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--out", type=Path, required=True, help="task artifact to write (.safetensors)")
    p.add_argument("--epochs", type=_positive, default=TRAIN_DEFAULTS.epochs)
    p.add_argument("--batch-size", type=_positive, default=TRAIN_DEFAULTS.batch_size)
    p.add_argument(
        "--lr",
        type=_positive_float,
        help="the coefficients' learning rate (default: chosen on validation from "
        f"{', '.join(f'{lr:g}' for lr in TRAIN_DEFAULTS.lr_grid)} by short trials)",
    )
    p.add_argument(
        "--coef-lr",
        type=_positive_float,
        default=TRAIN_DEFAULTS.coef_lr,
        help="the coefficients' own learning rate when the task also trains an FFN edit or a pooling "
        "query (--lr or its choice is then those parts' rate; default: "
        + ("the same as theirs" if TRAIN_DEFAULTS.coef_lr is None else f"{TRAIN_DEFAULTS.coef_lr:g}")
        + ")",
    )
    p.add_argument("--head-lr", type=_positive_float, default=TRAIN_DEFAULTS.head_lr)
    p.add_argument(
        "--select-epochs",
        type=_positive,
        default=TRAIN_DEFAULTS.select_epochs,
        help="epochs of each learning-rate trial (without --lr)",
    )
    p.add_argument("--max-length", type=_positive, default=TRAIN_DEFAULTS.max_length)
    p.add_argument("--max-train-examples", type=_positive)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--capacity",
        choices=CAPACITIES,
        default=TRAIN_DEFAULTS.capacity,
        help="what the task trains beside its head: ffn_edit (the default: the per-module template mix "
        "plus a per-channel scale and shift of every layer's FFN output) or coefficients (the mix alone, "
        "the paper's method: smaller, less accurate)",
    )
    p.add_argument(
        "--pooling",
        choices=POOLINGS,
        default=TRAIN_DEFAULTS.pooling,
        help="how the head pools the last hidden states: mean (the backbone's own pooling: mean, or CLS or "
        "max where its sentence-transformers config says so), or query (attention with one learned query)",
    )
    p.set_defaults(func=commands.run_train)

    p = sub.add_parser("inspect", help="print a task artifact's metadata as JSON")
    p.add_argument("task", type=Path)
    p.set_defaults(func=commands.run_inspect)

    p = sub.add_parser("predict", help="predict offline with a task artifact, or ask a server (--task-id)")
    p.add_argument("--bank", type=Path, help="offline: template bank directory")
    p.add_argument("--task", type=Path, help="offline: task artifact")
    _backbone_option(p)
    p.add_argument("--task-id", help="ask a running server for this task")
    _server_options(p, url_default=None)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--data", type=Path, help="predict every row of this .csv or .jsonl file (- : stdin)")
    p.add_argument("--out", type=Path, help="with --data: the .csv or .jsonl file to write")
    p.add_argument("--text-column", default="text", help="with --data: the column holding the text")
    p.add_argument("--format", choices=FILE_FORMATS, help="with --data: its format (default: by its name)")
    p.set_defaults(func=commands.run_predict)

    p = sub.add_parser("tasks", help="list, show, upload, delete or train tasks on a running server")
    p.add_argument("action", choices=("list", "get", "upload", "delete", "train"))
    p.add_argument("task_id", nargs="?", metavar="TASK_ID")
    p.add_argument(
        "file",
        nargs="?",
        type=Path,
        metavar="FILE",
        help="upload: the task artifact; train: a CSV (text,label)",
    )
    p.add_argument("--epochs", type=_positive, help="train: epochs (server default if unset)")
    p.add_argument("--wait", action="store_true", help="train: follow the job until it ends")
    p.add_argument("--if-match", type=int, help="only if the task is at this version (0: must not exist)")
    _server_options(p)
    p.set_defaults(func=commands.run_tasks)

    p = sub.add_parser(
        "serve",
        help="run the inference server (other settings: RECAST_* environment variables, see README)",
    )
    p.add_argument("--host", help="bind address (default 127.0.0.1, RECAST_HOST)")
    p.add_argument("--port", type=int, help="port (default 8000, RECAST_PORT)")
    p.add_argument("--bank", type=Path, help="template bank directory, built there if missing (RECAST_BANK)")
    p.add_argument(
        "--backbone",
        type=Path,
        help="a local Hugging Face encoder directory (RECAST_BACKBONE; default: the bundled MiniLM)",
    )
    p.add_argument("--store", help="task store: a directory or a postgresql:// DSN (RECAST_STORE)")
    p.add_argument(
        "--device", help="auto, cpu, cuda or cuda:N (default auto: CUDA when available; RECAST_DEVICE)"
    )
    p.add_argument(
        "--dtype",
        help="auto, float32, float16 or bfloat16 (auto: bf16 or fp16 on CUDA, fp32 on CPU; RECAST_DTYPE)",
    )
    p.add_argument(
        "--preload",
        action="append",
        metavar="TASK_ID=ARTIFACT",
        help="store this artifact as the task at start-up if the store never held the task (repeatable)",
    )
    p.set_defaults(func=commands.run_serve)

    p = sub.add_parser("keys", help="create, list or revoke tenant-scoped API keys in a keys file")
    p.add_argument("action", choices=("create", "list", "revoke"))
    p.add_argument(
        "--file",
        type=Path,
        default=Path(os.environ["RECAST_KEYS_FILE"]) if os.environ.get("RECAST_KEYS_FILE") else None,
        required=not os.environ.get("RECAST_KEYS_FILE"),
        help="the keys file the server reads (RECAST_KEYS_FILE)",
    )
    p.add_argument("--tenant", help="create: the tenant the key acts for ([a-z0-9][a-z0-9-]*)")
    p.add_argument("--role", choices=("admin", "predict"), default="predict", help="create: what it may do")
    p.add_argument("--id", help="create: a name for the key (default: generated); revoke: the key to drop")
    p.add_argument(
        "--rate", type=_positive_float, help="create: requests per second (server default if unset)"
    )
    p.add_argument("--burst", type=_positive, help="create: requests at once (server default if unset)")
    p.set_defaults(func=commands.run_keys)

    p = sub.add_parser("datasets", help="bundled real data sets with fixed splits")
    p.add_argument("action", choices=("list", "export"))
    p.add_argument("name", nargs="?")
    p.add_argument("--out", type=Path)
    p.set_defaults(func=commands.run_datasets)
    return parser
