"""A real `recast serve` on the Triton kernels (CPU tensors under TRITON_INTERPRET=1, as a GPU host runs
them on CUDA) answers a batch mixing two tasks like the CPU fast path does."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from server_harness import task_artifact

from benchmarks.server import server_process
from kernels import Kernels
from recast_core.artifact import TaskArtifact
from recast_core.backbone import TextBackbone
from recast_core.bank import TemplateBank
from server.serving.predictor import Predictor, TaskRequest
from server.stores.base import StoredTask
from server.tasks.heads import Head
from server.tasks.registry import TaskEntry

OCTET = {"Content-Type": "application/octet-stream"}
TEXTS = {
    "questions": ["Who wrote Hamlet?", "How far away is the Moon?"],
    "messages": ["WINNER! Claim your free prize now", "see you at five?", "ok"],
}
MAX_LENGTH = 16  # tokens: keeps the interpreted kernels to seconds per forward


def _fast_path_probabilities(
    backbone: TextBackbone, bank: TemplateBank, artifacts: dict[str, TaskArtifact]
) -> dict[str, torch.Tensor]:
    predictor = Predictor(backbone, bank, Kernels("cpu", path="torch"), max_length=MAX_LENGTH)
    requests = []
    for task, artifact in artifacts.items():
        data = artifact.to_bytes()
        entry = TaskEntry.of(StoredTask(task, 1, data, "now"), artifact, task)
        requests.append(TaskRequest(entry, Head.of(artifact), TEXTS[task]))
    return dict(zip(artifacts, predictor.probabilities(requests), strict=True))


def test_the_triton_path_serves_a_mixed_batch_like_the_cpu_fast_path(
    bank_dir: Path, tmp_path: Path, backbone: TextBackbone, default_bank: TemplateBank
) -> None:
    artifacts = {
        "questions": task_artifact(default_bank, 21, labels=("person", "place", "number")),
        "messages": task_artifact(default_bank, 22, labels=("ham", "spam")),
    }
    env = {
        "RECAST_DEVICE": "cpu",
        "RECAST_KERNEL": "triton",
        "TRITON_INTERPRET": "1",
        "RECAST_MAX_LENGTH": str(MAX_LENGTH),
        "RECAST_MAX_WAIT_MS": "400",  # the two requests below meet in one batch
        "RECAST_THREADS": "2",
    }
    with (
        server_process(bank_dir, tmp_path / "tasks", tmp_path / "server.log", timeout=600, env=env) as server,
        httpx.Client(base_url=server["url"], timeout=300) as http,
    ):
        for task, artifact in artifacts.items():
            assert (
                http.put(f"/v1/tasks/{task}", content=artifact.to_bytes(), headers=OCTET).status_code == 201
            )
        info = http.get("/v1/backbone").json()
        assert (info["kernel"]["path"], info["device"], info["dtype"]) == ("triton", "cpu", "float32")
        metrics = http.get("/metrics").text
        assert "recast_kernel_info{detail=" in metrics and 'device="cpu"' in metrics
        assert 'dtype="float32"' in metrics and 'path="triton"' in metrics

        def predict(task: str) -> httpx.Response:
            return http.post(f"/v1/tasks/{task}/predict", json={"inputs": TEXTS[task]})

        with ThreadPoolExecutor(2) as pool:  # in flight together: one forward mixes the two tasks
            answers = dict(zip(TEXTS, pool.map(predict, TEXTS), strict=True))
        metrics = http.get("/metrics").text
    mixed = [line for line in metrics.splitlines() if line.startswith('recast_batch_tasks_bucket{le="1.0"}')]
    total = [line for line in metrics.splitlines() if line.startswith("recast_batch_tasks_count")]
    assert float(total[0].split()[-1]) > float(mixed[0].split()[-1]), "no forward held both tasks"
    want = _fast_path_probabilities(backbone, default_bank, artifacts)
    for task, answer in answers.items():
        assert answer.status_code == 200, answer.text
        labels = artifacts[task].labels
        outputs = answer.json()["outputs"]
        got = torch.tensor([[o["scores"][label] for label in labels] for o in outputs])
        assert torch.allclose(got, want[task], atol=1e-4), (task, got, want[task])
        assert [o["label"] for o in outputs] == [labels[int(i)] for i in want[task].argmax(dim=1)]
