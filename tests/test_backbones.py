"""Any local Hugging Face encoder as the backbone, end to end for each supported family on a small randomly
initialised model saved to a temp directory: `recast mimic --backbone` is exact, `recast train --backbone`
trains a task, and a live server started on that backbone serves it as the offline model predicts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from server_harness import serving, task_artifact
from tiny_backbones import FAMILIES, HIDDEN, build_backbone

from recast_cli.main import main
from recast_core.artifact import read_artifact
from recast_core.backbone import TextBackbone, load_text_backbone
from recast_core.bank import load_bank
from recast_core.bank_fit import check_bank_fits
from recast_core.config import minilm_config
from recast_core.data import load_labelled
from recast_core.datasets import Splits
from recast_core.errors import BankError
from recast_core.families import bank_config
from recast_core.mimicry import mimic
from recast_core.task_model import TextTaskModel
from server.metrics import Metrics
from server.runtime import start_runtime
from server.settings import Settings

KEY = "admin-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN = AUTH | {"Content-Type": "application/octet-stream"}
TEXTS = ["Who wrote Hamlet?", "How far is the Moon?", "What is the capital of Peru?", "ok see you at 5"]
# layers and the pooling the directory's sentence-transformers files ask for (None: no such files)
SHAPES: dict[str, tuple[int, str | None]] = {
    "bert": (4, None),
    "roberta": (2, "cls"),
    "distilbert": (4, "max"),
    "xlm-roberta": (2, "mean"),
    "mpnet": (3, "cls"),
}


@pytest.fixture(scope="module")
def small_csv(trec: Splits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 TREC questions of three frequent classes."""
    picked: dict[str, list[int]] = {"HUM": [], "LOC": [], "NUM": []}
    for i, label in enumerate(trec.train.labels):
        if label in picked and len(picked[label]) < 20:
            picked[label].append(i)
    path = tmp_path_factory.mktemp("data") / "small.csv"
    trec.train.subset(sorted(i for rows in picked.values() for i in rows)).to_csv(path)
    return path


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _outputs(model: TextTaskModel) -> list[dict[str, Any]]:
    return [{"label": p.label, "scores": p.scores} for p in model.predict(TEXTS)]


@pytest.mark.parametrize("family", FAMILIES)
def test_mimic_train_and_serve(
    family: str, small_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layers, pooling = SHAPES[family]
    model_dir = build_backbone(tmp_path / family, family, layers=layers, pooling=pooling)
    backbone = load_text_backbone(model_dir)
    assert (backbone.family, backbone.num_layers, backbone.hidden_size) == (family, layers, HIDDEN)
    assert backbone.pooling == (pooling or "mean")
    if pooling == "cls":  # the sentence embedding is the first token's last hidden state
        batch = backbone.tokenize(TEXTS[:2])
        first = backbone.model(**batch).last_hidden_state[:, 0]
        assert torch.allclose(backbone.embed(TEXTS[:2]), first, atol=1e-6)

    bank_dir = tmp_path / "bank"
    code, out, err = _cli(capsys, "mimic", "--backbone", str(model_dir), "--out", str(bank_dir))
    assert code == 0, err
    report = json.loads((bank_dir / "mimicry.json").read_text())
    groups = -(-layers // 2)  # at most 2 layers (the templates) per group: exact
    assert report["config"]["groups"] == groups and report["backbone_family"] == family
    assert report["max_relative_error"] < 1e-5 and report["output_cosine"] > 0.9999, out
    bank = load_bank(bank_dir)
    assert (bank.backbone_name, bank.backbone_family) == (family, family)
    assert bank.num_slots == 4 * layers

    artifact_path = tmp_path / "task.safetensors"
    code, out, err = _cli(
        capsys,
        "train",
        "--backbone",
        str(model_dir),
        "--bank",
        str(bank_dir),
        "--data",
        str(small_csv),
        "--out",
        str(artifact_path),
        "--epochs",
        "2",
        "--lr",
        "0.1",
        "--max-length",
        "32",
    )
    assert code == 0, err
    assert "validation accuracy" in out and "3 labels" in out
    artifact = read_artifact(artifact_path)
    assert artifact.bank_fingerprint == bank.fingerprint
    assert tuple(artifact.coefficients.shape) == (4 * layers, 2)
    assert artifact.training["backbone"] == family
    offline = _outputs(TextTaskModel.from_artifact(backbone, bank, artifact))

    # an artifact for a bank of another backbone of the same family and layout (other random weights)
    other = load_text_backbone(build_backbone(tmp_path / "other", family, layers=layers, seed=1))
    foreign = task_artifact(mimic(other.model, bank_config(other), progress=False).bank, 1, hidden=HIDDEN)

    settings = Settings(
        backbone=model_dir,
        bank=bank_dir,
        store=str(tmp_path / "tasks"),
        api_keys=KEY,
        dtype="float32",
        train_threads=2,
        train_nice=0,
        train_idle_priority=False,
    )
    with serving(settings) as url, httpx.Client(base_url=url, timeout=30) as http:
        described = http.get("/v1/backbone").json()
        assert (described["model"], described["hidden_size"]) == (family, HIDDEN)
        assert (described["family"], described["pooling"]) == (family, backbone.pooling)
        put = http.put("/v1/tasks/questions", content=artifact_path.read_bytes(), headers=ADMIN)
        assert put.status_code in (200, 201), put.text
        answer = http.post("/v1/tasks/questions/predict", json={"inputs": TEXTS})
        assert answer.status_code == 200, answer.text
        served = answer.json()["outputs"]
        assert [o["label"] for o in served] == [o["label"] for o in offline]
        for got, want in zip(served, offline, strict=True):
            for label, p in want["scores"].items():
                assert abs(got["scores"][label] - p) < 1e-4, (label, got["scores"], want["scores"])
        refused = http.put("/v1/tasks/foreign", content=foreign.to_bytes(), headers=ADMIN)
        assert refused.status_code == 422 and refused.json()["reason"] == "fingerprint_mismatch", refused.text
        if family == "roberta":  # a training job: its worker process loads the server's backbone
            _train_on_the_server(http, small_csv)


def _train_on_the_server(http: httpx.Client, data: Path) -> None:
    rows = load_labelled(data)
    examples = [{"text": t, "label": y} for t, y in zip(rows.texts, rows.labels, strict=True)]
    options = {"epochs": 1, "lr": 0.1, "max_length": 32}
    created = http.post(
        "/v1/tasks/trained/train", json={"examples": examples, "options": options}, headers=AUTH
    )
    assert created.status_code == 202, created.text
    deadline = time.monotonic() + 120
    while (job := http.get(f"/v1/jobs/{created.json()['job_id']}", headers=AUTH).json())["state"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job["state"] == "succeeded", job
    answer = http.post("/v1/tasks/trained/predict", json={"inputs": TEXTS})
    assert answer.status_code == 200 and {o["label"] for o in answer.json()["outputs"]} <= {
        "HUM",
        "LOC",
        "NUM",
    }


def test_unsupported_family_lists_its_linear_modules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = build_backbone(tmp_path / "t5", "t5")
    code, out, err = _cli(capsys, "mimic", "--backbone", str(model_dir), "--out", str(tmp_path / "bank"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "model_type 't5' is not a supported family" in err
    assert "encoder.block.{layer}.layer.0.SelfAttention.q" in err and "DenseReluDense.wo" in err
    assert not (tmp_path / "bank").exists()


def test_not_a_model_directory_and_too_many_groups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _cli(capsys, "mimic", "--backbone", str(tmp_path), "--out", str(tmp_path / "bank"))
    assert code == 2 and "no Hugging Face model at" in err and len(err.strip().splitlines()) == 1
    model_dir = build_backbone(tmp_path / "bert", "bert", layers=2)
    code, _, err = _cli(
        capsys, "mimic", "--backbone", str(model_dir), "--groups", "3", "--out", str(tmp_path / "bank")
    )
    assert code == 2 and "groups=3 does not fit the 2 layers of backbone bert: choose 1 to 2" in err


def test_a_bank_of_another_backbone_is_refused(
    small_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bert = build_backbone(tmp_path / "bert", "bert", layers=2)
    mpnet = build_backbone(tmp_path / "mpnet", "mpnet", layers=2)
    twin = build_backbone(tmp_path / "twin", "bert", layers=2, seed=1)  # same layout, other weights
    bank_dir = tmp_path / "bank"
    assert _cli(capsys, "mimic", "--backbone", str(bert), "--out", str(bank_dir))[0] == 0

    code, _, err = _cli(
        capsys, "train", "--backbone", str(twin), "--bank", str(bank_dir), "--data", str(small_csv),
        "--out", str(tmp_path / "task.safetensors"),
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"the template bank {bank_dir} was made for backbone bert (bert, fingerprint" in err
    assert "not for the backbone in use, twin (bert, fingerprint" in err
    assert not (tmp_path / "task.safetensors").exists()

    for other, found in ((twin, "twin (bert, fingerprint"), (mpnet, "mpnet (mpnet, another layout)")):
        settings = Settings(backbone=other, bank=bank_dir, store=str(tmp_path / "tasks"))
        with pytest.raises(BankError, match=r"was made for backbone bert \(bert, fingerprint") as refused:
            start_runtime(settings, Metrics())
        assert found in str(refused.value)


def test_the_bundled_minilm_keeps_its_default_bank(backbone: TextBackbone, bank_dir: Path) -> None:
    assert (backbone.name, backbone.family, backbone.pooling, backbone.path) == (
        "all-MiniLM-L6-v2",
        "bert",
        "mean",
        None,
    )
    assert bank_config(backbone) == minilm_config()
    bank = load_bank(bank_dir)  # saved without the backbone's name, as banks were before it was recorded
    assert bank.backbone_name == ""
    check_bank_fits(bank, backbone, bank_dir)
