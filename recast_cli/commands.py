"""What each `recast` subcommand does, given its parsed arguments (recast_cli/parser.py builds them)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("recast")


class UsageError(Exception):
    """Bad command-line input detected after argument parsing."""


def run_mimic(args: argparse.Namespace) -> None:
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


def run_train(args: argparse.Namespace) -> None:
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
        coef_lr=args.coef_lr,
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


def run_inspect(args: argparse.Namespace) -> None:
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


def run_tasks(args: argparse.Namespace) -> None:
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


def run_predict(args: argparse.Namespace) -> int | None:
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


def run_datasets(args: argparse.Namespace) -> None:
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


def run_serve(args: argparse.Namespace) -> None:
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


def run_keys(args: argparse.Namespace) -> None:
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
