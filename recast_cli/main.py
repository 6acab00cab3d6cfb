"""`recast`: build template banks, train and inspect task artifacts, predict offline."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from recast_cli.logs import configure
from recast_cli.predict_files import FORMATS as FILE_FORMATS
from recast_client.errors import RecastClientError
from recast_core.errors import RecastError
from recast_core.train_options import CAPACITIES, POOLINGS, TrainOptions

log = logging.getLogger("recast")


class UsageError(Exception):
    """Bad command-line input detected after argument parsing."""


def _cmd_mimic(args: argparse.Namespace) -> None:
    from recast_core.backbone import load_text_backbone
    from recast_core.bank import write_report
    from recast_core.families import bank_config
    from recast_core.mimicry import PaperSchedule, mimic

    backbone = load_text_backbone(args.backbone)
    config = bank_config(backbone, groups=args.groups, templates=args.templates, coeff_sets=args.coeff_sets)
    log.info(
        "mimicry started", extra={"method": args.method, "config": config.to_dict(), "out": str(args.out)}
    )
    schedule = PaperSchedule(iterations=args.iterations)
    result = mimic(
        backbone.model, config, args.method, probe=backbone.probe(), seed=args.seed, schedule=schedule
    )
    result.bank.with_backbone(backbone.name, backbone.family).save(args.out)
    report = result.report.to_dict() | {
        "fingerprint": result.bank.fingerprint,
        "backbone": backbone.name,
        "backbone_family": backbone.family,
        "bank_bytes": result.bank.nbytes(),
    }
    write_report(args.out, report)
    rep = result.report
    print(
        f"bank {args.out} ({config.groups} groups x {config.templates} templates, K={config.coeff_sets}, "
        f"{args.method}): output cosine {rep.output_cosine:.8f} (min {rep.output_cosine_min:.8f}), "
        f"max relative weight error {rep.max_relative_error:.3g}, {rep.seconds:.1f} s, "
        f"{result.bank.num_slots * config.templates} coefficients per task, "
        f"fingerprint {result.bank.fingerprint[:16]}"
    )


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from recast_core.backbone import load_text_backbone
    from recast_core.bank import load_bank
    from recast_core.bank_fit import check_bank_fits

    bank = load_bank(args.bank)
    backbone = load_text_backbone(args.backbone)
    check_bank_fits(bank, backbone, args.bank)
    return backbone, bank


def _cmd_train(args: argparse.Namespace) -> None:
    from recast_core.data import load_labelled, require_classes
    from recast_core.training import TrainOptions, train_task

    def read(path: Path | None) -> Any:
        return None if path is None else load_labelled(path, args.text_column, args.label_column)

    train, val, test = read(args.data), read(args.val_data), read(args.test_data)
    require_classes(train, source=str(args.data))
    options = TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        head_lr=args.head_lr,
        select_epochs=args.select_epochs,
        max_length=args.max_length,
        max_train_examples=args.max_train_examples,
        seed=args.seed,
        capacity=args.capacity,
        pooling=args.pooling,
    )
    backbone, bank = _load(args)
    result = train_task(backbone, bank, train, val=val, test=test, options=options)
    size = result.artifact.save(args.out)
    summary = result.summary
    how = "chosen on validation" if args.lr is None else "given"
    print(f"coefficient learning rate {summary['lr']:g} ({how}; trials: {summary['lr_trials'] or '-'})")
    line = f"validation accuracy {summary['val_accuracy']:.4f}"
    line += f" (linear probe {summary['probe_val_accuracy']:.4f})"
    if "test_accuracy" in summary:
        line += f", test accuracy {summary['test_accuracy']:.4f}"
    print(line)
    print(
        f"wrote {args.out} ({size} bytes, {result.artifact.trainable_parameters} per-task parameters "
        f"({summary['capacity']}, {summary['pooling']} pooling), "
        f"{len(result.artifact.labels)} labels)"
    )


def _cmd_inspect(args: argparse.Namespace) -> None:
    from recast_core.artifact import read_artifact

    artifact = read_artifact(args.task)
    print(
        json.dumps(
            {
                "labels": list(artifact.labels),
                "bank_fingerprint": artifact.bank_fingerprint,
                "trainable_parameters": artifact.trainable_parameters,
                "head_parameters": artifact.head_parameters,
                "coefficients_shape": list(artifact.coefficients.shape),
                "bytes": args.task.stat().st_size,
                "schema_version": artifact.schema_version,
                "created": artifact.created,
                "training": artifact.training,
            },
            indent=2,
        )
    )


def _client(args: argparse.Namespace) -> Any:
    from recast_client import Client

    return Client(args.url, args.api_key)


def _cmd_tasks(args: argparse.Namespace) -> None:
    with _client(args) as client:
        if args.action == "list":
            for task in client.iter_tasks():
                print(json.dumps(task))
            return
        if args.task_id is None:
            raise UsageError(f"tasks {args.action} needs TASK_ID")
        if args.action == "get":
            result = client.get_task(args.task_id)
        elif args.action == "upload":
            if args.file is None:
                raise UsageError("tasks upload needs TASK_ID FILE")
            if not args.file.is_file():
                raise UsageError(f"no artifact file {args.file}")
            result = client.upload(args.task_id, args.file, if_match=args.if_match)
        elif args.action == "train":
            if args.file is None or not args.file.is_file():
                raise UsageError("tasks train needs TASK_ID FILE (a CSV with text and label columns)")
            options = {"epochs": args.epochs} if args.epochs is not None else {}
            result = client.train(args.task_id, args.file, options=options)
            if args.wait:
                result = _follow(client, result)
        else:
            result = client.delete(args.task_id, if_match=args.if_match)
        print(json.dumps(result, indent=2))


def _follow(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Show a training job's progress until it ends; the final job, or an error if it did not succeed."""
    import time

    from tqdm import tqdm

    with tqdm(
        total=100, desc=f"training {job['task_id']}", unit="%", bar_format="{l_bar}{bar}| {postfix}"
    ) as bar:
        while job["state"] in ("queued", "running"):
            time.sleep(1.0)
            job = client.get_job(job["job_id"])
            bar.n = round(100 * job["progress"])
            bar.set_postfix_str(f"{job['state']}, {job['phase']}")
    if job["state"] != "succeeded":
        raise UsageError(f"job {job['job_id']} {job['state']}: {job['error']}")
    return job


def _cmd_predict(args: argparse.Namespace) -> int | None:
    if (args.task is None) == (args.task_id is None):
        raise UsageError("predict needs one of --task (offline, with --bank) and --task-id (a server)")
    if args.task_id is not None and args.bank is not None:
        raise UsageError("predict from a server takes --task-id (and --url), not --bank/--task")
    if args.data is not None:
        if args.texts or args.out is None:
            raise UsageError("predict --data FILE needs --out FILE (.csv or .jsonl) and no TEXT arguments")
        if args.task is not None and args.bank is None:
            raise UsageError("predict offline needs --bank and --task (or --task-id to ask a server)")
        from recast_cli.predict_cmd import predict_file

        return predict_file(args, _load)
    if not args.texts:
        raise UsageError("predict needs TEXT arguments, or --data FILE --out FILE")
    if args.task_id is not None:
        with _client(args) as client:
            answer = client.predict(args.task_id, args.texts)
        for text, output in zip(args.texts, answer["outputs"], strict=True):
            print(json.dumps({"text": text, "label": output["label"], "scores": output["scores"]}))
        return None
    if args.bank is None or args.task is None:
        raise UsageError("predict offline needs --bank and --task (or --task-id to ask a server)")
    from recast_core.artifact import read_artifact
    from recast_core.task_model import TextTaskModel, artifact_spec

    backbone, bank = _load(args)
    artifact = read_artifact(
        args.task, artifact_spec(bank, backbone.hidden_size, None, backbone.embedding_bound())
    )
    model = TextTaskModel.from_artifact(backbone, bank, artifact)
    for text, pred in zip(args.texts, model.predict(args.texts), strict=True):
        print(json.dumps({"text": text, "label": pred.label, "scores": pred.scores}))
    return None


def _cmd_datasets(args: argparse.Namespace) -> None:
    from recast_core.datasets import LOADERS, load_splits

    if args.action == "list":
        for name in sorted(LOADERS):
            print(name)
        return
    if args.name is None or args.out is None:
        raise UsageError("datasets export needs NAME and --out DIR")
    splits = load_splits(args.name)
    for part in ("train", "val", "test"):
        getattr(splits, part).to_csv(args.out / f"{part}.csv")
    print(
        f"wrote {args.out}/{{train,val,test}}.csv "
        f"({len(splits.train)}/{len(splits.val)}/{len(splits.test)} rows)"
    )


def _cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn
    from pydantic import ValidationError

    from server import create_app
    from server.settings import Settings

    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("host", args.host),
            ("port", args.port),
            ("bank", args.bank),
            ("store", args.store),
            ("device", args.device),
            ("dtype", args.dtype),
            ("backbone", args.backbone),
        )
        if value is not None
    }
    if args.preload:
        overrides["preload"] = ",".join(args.preload)
    from kernels.dispatch import KernelUnavailable
    from recast_core.device import DeviceError
    from server.auth.keys import KeysFileError
    from server.runtime import serving_device

    try:
        settings = Settings(**overrides)
        serving_device(settings)  # an unusable device or dtype is a one-line error before anything loads
        app = create_app(settings)
    except (DeviceError, KernelUnavailable) as exc:
        raise UsageError(str(exc)) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"bad setting: {problems}") from None
    except KeysFileError as exc:
        raise UsageError(str(exc)) from None
    from server.api.http_protocol import server_config

    server = uvicorn.Server(server_config(app, settings))
    server.run()
    if not server.started:
        raise UsageError("the server did not start (the reason is in the log above)")


def _cmd_keys(args: argparse.Namespace) -> None:
    from server.auth.keys import KeysFileError, create_key, read_keys_file, revoke_key

    path: Path = args.file
    try:
        if args.action == "create":
            if args.tenant is None:
                raise UsageError("keys create needs --tenant")
            key, record = create_key(path, args.tenant, args.role, args.id, args.rate, args.burst)
            print(
                f"created key {record.id} (tenant {record.tenant}, role {record.role}) in {path}",
                file=sys.stderr,
            )
            print("the key is shown only now; the file keeps its SHA-256:", file=sys.stderr)
            print(key)
        elif args.action == "list":
            for record in read_keys_file(path):
                fields: dict[str, Any] = {"id": record.id, "tenant": record.tenant, "role": record.role}
                fields |= {"rate_per_s": record.rate_per_s, "burst": record.burst}
                print(json.dumps({k: v for k, v in fields.items() if v is not None}))
        else:
            if args.id is None:
                raise UsageError("keys revoke needs --id KEY_ID")
            record = revoke_key(path, args.id)
            print(f"revoked key {record.id} (tenant {record.tenant}); servers drop it within a second")
    except KeysFileError as exc:
        raise UsageError(str(exc)) from None


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
    parser = argparse.ArgumentParser(prog="recast", description=__doc__)
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
    p.set_defaults(func=_cmd_mimic)

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
        help="what the task trains beside its head: coefficients (the per-module template mix) or "
        "ffn_edit (those plus a per-channel scale and shift of every layer's FFN output)",
    )
    p.add_argument(
        "--pooling",
        choices=POOLINGS,
        default=TRAIN_DEFAULTS.pooling,
        help="how the head pools the last hidden states: mean, or query (attention with one learned query)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("inspect", help="print a task artifact's metadata as JSON")
    p.add_argument("task", type=Path)
    p.set_defaults(func=_cmd_inspect)

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
    p.set_defaults(func=_cmd_predict)

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
    p.set_defaults(func=_cmd_tasks)

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
    p.set_defaults(func=_cmd_serve)

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
    p.set_defaults(func=_cmd_keys)

    p = sub.add_parser("datasets", help="bundled real data sets with fixed splits")
    p.add_argument("action", choices=("list", "export"))
    p.add_argument("name", nargs="?")
    p.add_argument("--out", type=Path)
    p.set_defaults(func=_cmd_datasets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(logging.DEBUG if args.verbose else logging.INFO)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        code = func(args)
    except (RecastError, UsageError, RecastClientError) as exc:
        message = " ".join(str(exc).split())
        print(f"recast {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recast: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
