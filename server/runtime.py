"""Everything the server holds while it runs, built once at start-up and torn down at shutdown.

backbone -> bank (loaded, or built and cached on first start) -> kernels -> predictor
store -> registry (every task resident) -> catalog (uploads, deletes, other replicas' changes)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import Kernels
from kernels.dispatch import select_path
from recast_core.backbone import TextBackbone, load_text_backbone
from recast_core.bank import BANK_FILE, TemplateBank, load_bank, write_report
from recast_core.bank_fit import check_bank_fits
from recast_core.device import DeviceError, dtype_name, resolve_device, resolve_dtype
from recast_core.errors import BankError
from recast_core.families import bank_config
from recast_core.mimicry import mimic
from recast_core.task_model import artifact_spec
from server.errors import VersionConflict
from server.metrics import Metrics
from server.serving.predictor import Predictor
from server.settings import Settings
from server.stores import TaskStore, open_store
from server.stores.jobs import JobStore, open_job_store
from server.tasks.catalog import TaskCatalog
from server.tasks.heads import HeadCache
from server.tasks.registry import TaskRegistry
from server.training.manager import JobManager

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    backbone: TextBackbone
    bank: TemplateBank
    device: torch.device
    dtype: torch.dtype
    kernels: Kernels
    predictor: Predictor
    registry: TaskRegistry
    store: TaskStore
    catalog: TaskCatalog
    metrics: Metrics
    job_store: JobStore
    jobs: JobManager

    def close(self) -> None:
        try:
            self.jobs.close()
            self.job_store.close()
        finally:
            self.store.close()


def load_or_build_bank(directory: Path, backbone: TextBackbone) -> TemplateBank:
    """The bank in `directory`, checked against `backbone`; built with the backbone's default config (svd
    mimicry) and saved there if missing."""
    if (directory / BANK_FILE).is_file():
        bank = load_bank(directory)
        check_bank_fits(bank, backbone, directory)
        return bank
    log.info("no template bank yet: building the default one", extra={"bank": str(directory)})
    start = time.perf_counter()
    result = mimic(backbone.model, bank_config(backbone), "svd", probe=backbone.probe(), progress=True)
    built = result.bank.with_backbone(backbone.name, backbone.family)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        built.save(staging)
        write_report(staging, result.report.to_dict() | {"fingerprint": built.fingerprint})
        if (directory / BANK_FILE).is_file():  # another process built it meanwhile: use theirs
            bank = load_bank(directory)
            check_bank_fits(bank, backbone, directory)
            return bank
        if directory.exists():
            directory.rmdir()  # an empty leftover; a non-empty one is not ours to replace (raises)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "template bank built",
        extra={
            "bank": str(directory),
            "fingerprint": result.bank.fingerprint,
            "output_cosine": result.report.output_cosine,
            "seconds": round(time.perf_counter() - start, 2),
        },
    )
    return built


def _preload(catalog: TaskCatalog, task_id: str, path: Path) -> None:
    """Store the artifact at `path` as `task_id` if the store never held that task.

    A task uploaded or deleted since is left alone: restarts never roll tasks back."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BankError(f"cannot read preload artifact {path}: {exc}") from None
    if catalog.registry.known_version(task_id) > 0:
        return
    try:
        entry = catalog.upload(task_id, data, if_match=0)
    except VersionConflict:  # another replica stored it meanwhile
        return
    log.info("task preloaded", extra={"task_id": task_id, "version": entry.version, "artifact": str(path)})


def serving_device(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the settings ask for, checked with the kernel path (DeviceError or
    KernelUnavailable, both naming what cannot be used); cheap: nothing is loaded."""
    device = resolve_device(settings.device)
    path = select_path(device, settings.kernel)
    dtype = resolve_dtype(settings.dtype, device, path.value)
    return device, dtype


def start_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    device, dtype = serving_device(settings)
    backbone = load_text_backbone(settings.backbone)
    bank = load_or_build_bank(settings.bank, backbone)
    kernels = Kernels(device, path=settings.kernel)
    metrics.kernel.info(
        {
            "path": kernels.path.value,
            "detail": kernels.detail,
            "device": str(device),
            "dtype": dtype_name(dtype),
        }
    )
    try:
        predictor = Predictor(backbone, bank, kernels, max_length=settings.max_length, dtype=dtype)
    except torch.cuda.OutOfMemoryError as exc:
        raise DeviceError(f"device {device}: out of memory placing the model and bank: {exc}") from None
    registry = TaskRegistry(
        artifact_spec(bank, backbone.hidden_size, settings.max_upload_bytes, backbone.embedding_bound()),
        HeadCache(settings.head_cache_bytes, device=device, dtype=dtype),
    )
    store = open_store(settings.store)
    job_store: JobStore | None = None
    jobs: JobManager | None = None
    try:
        catalog = TaskCatalog(store, registry, metrics)
        store.watch(catalog.on_change, catalog.resync)  # before the first scan: no change falls in between
        catalog.load()
        for task_id, path in settings.preloads:
            _preload(catalog, task_id, path)
        job_store = open_job_store(settings.store, getattr(store, "safe_dsn", None))
        jobs = JobManager(
            job_store,
            catalog,
            settings.bank,
            bank.fingerprint,
            max_jobs=settings.max_training_jobs,
            max_queued=settings.max_queued_jobs,
            threads=settings.train_threads,
            nice=settings.train_nice,
            idle_priority=settings.train_idle_priority,
            keep_finished=settings.job_keep_finished,
            keep_seconds=settings.job_keep_days * 86_400,
            metrics=metrics,
            backbone_dir=settings.backbone,
        )
        predictor.warm_up()
    except BaseException:  # a failed start releases everything it had started, in reverse order
        try:
            if jobs is not None:
                jobs.close()
            if job_store is not None:
                job_store.close()
        finally:
            store.close()
        raise
    log.info(
        "server runtime ready",
        extra={
            "backbone": backbone.name,
            "bank_fingerprint": bank.fingerprint,
            "kernel_path": kernels.path.value,
            "device": str(device),
            "dtype": dtype_name(dtype),
            "store": store.kind,
            "tasks": len(registry),
            "seconds": round(time.perf_counter() - start, 2),
        },
    )
    return Runtime(
        settings,
        backbone,
        bank,
        device,
        dtype,
        kernels,
        predictor,
        registry,
        store,
        catalog,
        metrics,
        job_store,
        jobs,
    )
