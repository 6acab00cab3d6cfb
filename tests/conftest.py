from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pg_cluster import PgCluster

from recast_core.backbone import TextBackbone, load_text_backbone
from recast_core.bank import TemplateBank
from recast_core.config import minilm_config
from recast_core.datasets import Splits, load_splits
from recast_core.mimicry import MimicryResult, mimic
from server.stores.postgres import PostgresStore


@pytest.fixture(scope="session")
def backbone() -> TextBackbone:
    return load_text_backbone()


@pytest.fixture(scope="session")
def default_mimicry(backbone: TextBackbone) -> MimicryResult:
    return mimic(backbone.model, minilm_config(), "svd", probe=backbone.probe(), progress=False)


@pytest.fixture(scope="session")
def default_bank(default_mimicry: MimicryResult) -> TemplateBank:
    return default_mimicry.bank


@pytest.fixture(scope="session")
def bank_dir(default_bank: TemplateBank, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bank")
    default_bank.save(directory)
    return directory


@pytest.fixture(scope="session")
def trec() -> Splits:
    return load_splits("trec")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PgCluster]:
    """A real, throwaway PostgreSQL server for the session; tests may stop, start or restart it."""
    cluster = PgCluster.create()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def postgres_dsn(postgres_cluster: PgCluster) -> str:
    return postgres_cluster.dsn


@pytest.fixture
def make_store(postgres_dsn: str) -> Iterator[Callable[[], PostgresStore]]:
    """PostgreSQL stores on one fresh table and channel (like replicas of one deployment), closed at the
    end."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    stores: list[PostgresStore] = []

    def make() -> PostgresStore:
        stores.append(PostgresStore(postgres_dsn, table=name, channel=name, connect_timeout=2))
        return stores[-1]

    yield make
    for store in stores:
        store.close()
