"""The Open Inference Protocol v2 REST API end to end, driven by the real clients of Triton and KServe
(tritonclient[http], kserve's InferenceRESTClient) against a live server with two tenants, real MiniLM."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from server_harness import serving, task_artifact, two_tenants_keys
from tritonclient.utils import InferenceServerException

from recast_core.bank import TemplateBank
from server.settings import Settings

OCTETS = {"Content-Type": "application/octet-stream"}
TEXTS = ["Who wrote Hamlet?", "free entry in a weekly prize draw", "ok see you at 5", "Ça va très bien 🙂"]
TOPICS = ("sports", "science", "arts")


@dataclass
class Live:
    url: str
    address: str  # host:port, as tritonclient takes it
    keys: dict[str, str]

    def bearer(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}


@pytest.fixture(scope="module")
def live(
    bank_dir: Path, default_bank: TemplateBank, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("oip-v2")
    path = root / "keys.json"
    keys = two_tenants_keys(path)
    settings = Settings(
        bank=bank_dir,
        store=str(root / "tasks"),
        keys_file=path,
        threads=2,
        max_wait_ms=2.0,
        max_inputs=16,
        dtype="float32",
    )
    with serving(settings) as url:
        server = Live(url, url.removeprefix("http://"), keys)
        uploads = (
            ("a_admin", "topics", task_artifact(default_bank, 21, labels=TOPICS)),
            ("a_admin", "sentiment", task_artifact(default_bank, 22)),
            ("b_admin", "spam", task_artifact(default_bank, 23, labels=("ham", "spam"))),
        )
        for who, task_id, artifact in uploads:
            answer = httpx.put(
                f"{url}/v1/tasks/{task_id}",
                content=artifact.to_bytes(),
                headers=server.bearer(who) | OCTETS,
                timeout=60,
            )
            assert answer.status_code == 201, answer.text
        yield server


def _v1(live: Live, task_id: str, texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Labels and probabilities (in the task's label order) as /v1 predict answers them."""
    answer = httpx.post(
        f"{live.url}/v1/tasks/{task_id}/predict",
        json={"inputs": texts},
        headers=live.bearer("a_predict"),
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    outputs = answer.json()["outputs"]
    labels = list(outputs[0]["scores"])
    return [o["label"] for o in outputs], np.array([[o["scores"][k] for k in labels] for o in outputs])


def _texts(array: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]


def test_tritonclient_health_metadata_and_readiness(live: Live) -> None:
    client = triton.InferenceServerClient(live.address)
    headers = live.bearer("a_predict")
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "recast-serve" and "binary_tensor_data" in server["extensions"]

    meta = client.get_model_metadata("topics", headers=headers)
    assert meta["name"] == "topics" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]
    assert meta["parameters"]["labels"] == list(TOPICS)
    assert client.get_model_metadata("topics", model_version="1", headers=headers) == meta
    assert client.is_model_ready("topics", headers=headers)
    assert client.is_model_ready("topics", model_version="1", headers=headers)
    assert not client.is_model_ready("topics", model_version="2", headers=headers)
    with pytest.raises(InferenceServerException) as other_version:
        client.get_model_metadata("topics", model_version="2", headers=headers)
    assert other_version.value.status() == "404" and "current version is 1" in other_version.value.message()

    # another tenant's task is no model of this tenant's, exactly like one that does not exist
    assert not client.is_model_ready("spam", headers=headers)
    for task_id in ("spam", "nope"):
        with pytest.raises(InferenceServerException) as unknown:
            client.get_model_metadata(task_id, headers=headers)
        assert unknown.value.status() == "404" and "team-" not in unknown.value.message()
    client.close()


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary_in", "json_in"])
@pytest.mark.parametrize("binary_out", [True, False, None], ids=["binary_out", "json_out", "default_out"])
def test_tritonclient_infer_answers_as_v1_predict(
    live: Live, binary_in: bool, binary_out: bool | None
) -> None:
    client = triton.InferenceServerClient(live.address)
    text = triton.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array(TEXTS, dtype=object), binary_data=binary_in)
    outputs = (
        None
        if binary_out is None  # tritonclient then asks for every output in binary (binary_data_output)
        else [
            triton.InferRequestedOutput(name, binary_data=binary_out) for name in ("label", "probabilities")
        ]
    )
    result = client.infer(
        "topics", [text], outputs=outputs, request_id="r-1", headers=live.bearer("a_predict")
    )
    response = result.get_response()
    assert response["model_name"] == "topics" and response["model_version"] == "1" and response["id"] == "r-1"
    binary = binary_out is not False
    for output in response["outputs"]:
        assert ("binary_data_size" in output.get("parameters", {})) is binary, output
        assert ("data" in output) is not binary
    labels, probabilities = _v1(live, "topics", TEXTS)
    assert _texts(result.as_numpy("label")) == labels
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(got, probabilities, rtol=0, atol=1e-6)
    client.close()


def test_tritonclient_versioned_infer_one_output_and_the_repository_index(live: Live) -> None:
    client = triton.InferenceServerClient(live.address)
    text = triton.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array(TEXTS[:2], dtype=object))
    result = client.infer(
        "sentiment",
        [text],
        model_version="1",
        outputs=[triton.InferRequestedOutput("label")],
        headers=live.bearer("a_admin"),
    )
    assert result.as_numpy("probabilities") is None
    assert _texts(result.as_numpy("label")) == _v1(live, "sentiment", TEXTS[:2])[0]
    with pytest.raises(InferenceServerException) as other_version:
        client.infer("sentiment", [text], model_version="3", headers=live.bearer("a_admin"))
    assert other_version.value.status() == "404"

    index = client.get_model_repository_index(headers=live.bearer("a_admin"))
    assert index == [
        {"name": "sentiment", "version": "1", "state": "READY"},
        {"name": "topics", "version": "1", "state": "READY"},
    ]
    assert client.get_model_repository_index(headers=live.bearer("b_admin")) == [
        {"name": "spam", "version": "1", "state": "READY"}
    ]
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_repository_index(headers=live.bearer("a_predict"))
    assert refused.value.status() == "403"
    with pytest.raises(InferenceServerException) as no_key:
        client.get_model_repository_index()
    assert no_key.value.status() == "401"
    client.close()


def test_kserve_rest_client_infers_in_json_and_binary(live: Live) -> None:
    labels, probabilities = _v1(live, "topics", TEXTS)

    async def run() -> None:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        headers = live.bearer("a_predict")
        try:
            assert await client.is_server_live(live.url) is True
            assert await client.is_server_ready(live.url) is True
            assert await client.is_model_ready(live.url, "topics", headers=headers) is True
            assert await client.is_model_ready(live.url, "spam", headers=headers) is False  # team-b's
            for binary_in, binary_out in ((False, False), (True, True), (True, False)):
                text = InferInput("text", [len(TEXTS)], "BYTES")
                text.set_data_from_numpy(np.array(TEXTS, dtype=object), binary_data=binary_in)
                request = InferRequest(
                    model_name="topics",
                    infer_inputs=[text],
                    request_id="k-1",
                    parameters={"binary_data_output": binary_out},
                )
                response = await client.infer(live.url, request, model_name="topics", headers=dict(headers))
                assert response.model_name == "topics" and response.id == "k-1"
                by_name = {output.name: output for output in response.outputs}
                assert _texts(by_name["label"].as_numpy()) == labels
                got = by_name["probabilities"].as_numpy()
                assert got.shape == (len(TEXTS), 3)
                np.testing.assert_allclose(got.astype(np.float32), probabilities, rtol=0, atol=1e-6)
            text = InferInput("text", [1], "BYTES")
            text.set_data_from_numpy(np.array(TEXTS[:1], dtype=object), binary_data=False)
            one = InferRequest(
                "topics",
                [text],
                request_outputs=[RequestedOutput("probabilities", parameters={"binary_data": True})],
            )
            response = await client.infer(live.url, one, model_name="topics", headers=dict(headers))
            assert [output.name for output in response.outputs] == ["probabilities"]
            with pytest.raises(httpx.HTTPStatusError) as unknown:
                await client.infer(live.url, one, model_name="spam", headers=dict(headers))
            assert unknown.value.response.status_code == 404 and "no task 'spam'" in str(unknown.value)
        finally:
            await client.close()

    asyncio.run(run())


def _framed(header: dict[str, Any], binary: bytes) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(header).encode()
    return raw + binary, {"Inference-Header-Content-Length": str(len(raw))} | OCTETS


def _element(text: bytes) -> bytes:
    return struct.pack("<I", len(text)) + text


def _text_input(binary: bytes, shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": shape if shape is not None else [1],
                "parameters": {"binary_data_size": len(binary)},
            }
        ]
    }


def test_malformed_requests_answer_400_with_the_protocol_error_and_the_server_keeps_serving(
    live: Live,
) -> None:
    good = _element(b"hello there")
    bodies: dict[str, tuple[bytes, dict[str, str]]] = {
        "header length past the body": (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}),
        "header length not a number": (b"{}", {"Inference-Header-Content-Length": "ten"}),
        "header not JSON": (b"{{{", {}),
        "binary element overruns": _framed(
            _text_input(struct.pack("<I", 50) + b"short"), struct.pack("<I", 50) + b"short"
        ),
        "truncated length prefix": _framed(_text_input(good + b"\x01\x00"), good + b"\x01\x00"),
        "not UTF-8": _framed(_text_input(_element(b"\xff\xfe")), _element(b"\xff\xfe")),
        "size differs from what follows": _framed(_text_input(good), good + b"extra"),
        "shape disagrees with the elements": _framed(_text_input(good, [2]), good),
        "two dimensions": _framed(_text_input(good, [1, 1]), good),
        "wrong datatype": (
            json.dumps(
                {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
            ).encode(),
            {},
        ),
        "wrong input name": (
            json.dumps(
                {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
            ).encode(),
            {},
        ),
        "not a string": (
            json.dumps(
                {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [7]}]}
            ).encode(),
            {},
        ),
        "unknown output": (
            json.dumps(
                {
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
                    "outputs": [{"name": "logits"}],
                }
            ).encode(),
            {},
        ),
        "binary_data not a flag": (
            json.dumps(
                {
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
                    "parameters": {"binary_data_output": "yes"},
                }
            ).encode(),
            {},
        ),
        "no texts": (
            json.dumps(
                {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]}
            ).encode(),
            {},
        ),
        "too many texts": (
            json.dumps(
                {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [17], "data": ["a"] * 17}]}
            ).encode(),
            {},
        ),
    }
    with httpx.Client(base_url=live.url, timeout=60, headers=live.bearer("a_predict")) as http:
        for case, (content, headers) in bodies.items():
            answer = http.post("/v2/models/topics/infer", content=content, headers=headers)
            assert answer.status_code == 400, (case, answer.text)
            assert list(answer.json()) == ["error"] and answer.json()["error"], (case, answer.text)
        # the other errors of the protocol's shape, /v1 keeps its typed bodies
        for method, path, status in (
            ("POST", "/v2/models/spam/infer", 404),
            ("GET", "/v2/models/topics/infer", 405),
            ("GET", "/v2/nowhere", 404),
        ):
            answer = http.request(method, path, json={})
            assert answer.status_code == status and list(answer.json()) == ["error"], (path, answer.text)
        unauthorized = httpx.post(f"{live.url}/v2/repository/index", timeout=60)
        assert unauthorized.status_code == 401 and list(unauthorized.json()) == ["error"]
        assert unauthorized.headers["www-authenticate"] == "Bearer"
        assert set(http.post("/v1/tasks/spam/predict", json={"inputs": ["a"]}).json()) == {
            "error",
            "error_type",
        }
        # a binary request straight after the bad ones is answered
        content, headers = _framed(_text_input(good), good)
        answer = http.post("/v2/models/topics/infer", content=content, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["outputs"][0]["data"] == _v1(live, "topics", ["hello there"])[0]
