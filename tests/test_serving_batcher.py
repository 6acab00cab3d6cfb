"""The batcher on its own (a stand-in forward, real tasks): failures stay with their request, tenants
share the queue fairly and batches are filled round-robin across tenants."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from tiny_tasks import TINY_SPEC, tiny_artifact

from recast_core.artifact import TaskArtifact
from recast_core.task_model import Prediction
from server.errors import Overloaded, ServerError
from server.serving.batcher import Batcher, Result
from server.serving.predictor import TaskRequest
from server.stores.directory import DirectoryStore
from server.tasks.catalog import TaskCatalog
from server.tasks.heads import Head
from server.tasks.registry import TaskEntry, TaskRegistry

SPEC = TINY_SPEC
POISON = "\ud800"


def _artifact(seed: int) -> TaskArtifact:
    return tiny_artifact(seed, labels=("no", "yes"))


@pytest.fixture
def tasks(tmp_path: Path) -> dict[str, tuple[TaskEntry, Head]]:
    """One task in each of the tenants default, a, b and c."""
    catalog = TaskCatalog(DirectoryStore(tmp_path / "tasks"), TaskRegistry(SPEC))
    found = {}
    for seed, (tenant, stored_id) in enumerate([("default", "t"), ("a", "a~t"), ("b", "b~t"), ("c", "c~t")]):
        entry = catalog.upload(stored_id, _artifact(seed).to_bytes())
        found[tenant] = (entry, catalog.registry.head(entry))
    return found


def _answer(requests: Sequence[TaskRequest]) -> list[Result]:
    """Like the encoder's forward: the whole batch fails if any text cannot be tokenized."""
    if any(POISON in text for r in requests for text in r.texts):
        raise TypeError(
            "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]"
        )
    return [[Prediction(r.texts[0], {"no": 0.5, "yes": 0.5}) for _ in r.texts] for r in requests]


def test_a_poisoned_request_fails_alone_and_is_logged_once(
    tasks: dict[str, tuple[TaskEntry, Head]], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def forward(requests: Sequence[TaskRequest]) -> list[Result]:
        calls.append(len(requests))
        return _answer(requests)

    async def scenario() -> list[object]:
        batcher = Batcher(forward, max_batch_texts=64, max_wait=0.05, max_queue_texts=256)
        batcher.start()
        submitted = []
        for i in range(7):  # six good requests of tenant b, one poisoned of tenant a, in flight together
            tenant, text = ("a", POISON) if i == 3 else ("b", f"text {i}")
            entry, head = tasks[tenant]
            submitted.append(batcher.submit(TaskRequest(entry, head, [text])))
        results = await asyncio.gather(*submitted, return_exceptions=True)
        await batcher.stop()
        return results

    with caplog.at_level(logging.WARNING, logger="server.batcher"):
        results = asyncio.run(scenario())
    assert calls[0] == 7, "the seven requests were not batched together"
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(results[3], ServerError) and results[3].status == 500
    assert [r[0].label for i, r in enumerate(results) if i != 3] == [f"text {i}" for i in range(7) if i != 3]  # type: ignore[index]
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].task_id == "a~t"  # type: ignore[attr-defined]


def test_a_flooding_tenant_cannot_take_the_queue_from_another(
    tasks: dict[str, tuple[TaskEntry, Head]],
) -> None:
    release = asyncio.Event()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        def forward(requests: Sequence[TaskRequest]) -> list[Result]:
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()  # hold the first batch
            return _answer(requests)

        batcher = Batcher(forward, max_batch_texts=4, max_wait=0.0, max_queue_texts=40)
        batcher.start()
        (a, a_head), (b, b_head), (c, c_head) = tasks["a"], tasks["b"], tasks["c"]
        first = asyncio.ensure_future(batcher.submit(TaskRequest(a, a_head, ["x"] * 4)))
        await asyncio.sleep(0.05)  # the first batch is running (held): the rest queues
        flood_a = [
            asyncio.ensure_future(batcher.submit(TaskRequest(a, a_head, ["x"] * 4))) for _ in range(20)
        ]
        flood_b = [
            asyncio.ensure_future(batcher.submit(TaskRequest(b, b_head, ["x"] * 4))) for _ in range(20)
        ]
        await asyncio.sleep(0.05)
        assert batcher.queued_texts_of("a") <= 40 and batcher.queued_texts_of("b") <= 20
        occasional = asyncio.ensure_future(batcher.submit(TaskRequest(c, c_head, ["c"])))
        await asyncio.sleep(0.01)
        assert not occasional.done(), "the third tenant's request was refused"
        with pytest.raises(Overloaded, match="share"):  # a over its share of three tenants: 429 at once
            await batcher.submit(TaskRequest(a, a_head, ["x"] * 4))
        release.set()
        outputs = await asyncio.wait_for(occasional, 10)
        assert outputs[0].label == "c"
        results = await asyncio.gather(first, *flood_a, *flood_b, return_exceptions=True)
        assert any(isinstance(r, Overloaded) for r in results)  # the floods were bounded...
        assert any(isinstance(r, list) for r in results[1:21]) and any(
            isinstance(r, list) for r in results[21:]
        )
        await batcher.stop()

    asyncio.run(scenario())


def test_batches_are_filled_round_robin_across_tenants(tasks: dict[str, tuple[TaskEntry, Head]]) -> None:
    batches: list[list[str]] = []
    release = asyncio.Event()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        def forward(requests: Sequence[TaskRequest]) -> list[Result]:
            if not batches:
                asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
            batches.append([r.entry.task_id for r in requests])
            return _answer(requests)

        batcher = Batcher(forward, max_batch_texts=3, max_wait=0.0, max_queue_texts=100)
        batcher.start()
        (a, a_head), (b, b_head) = tasks["a"], tasks["b"]
        work = [asyncio.ensure_future(batcher.submit(TaskRequest(a, a_head, ["first"])))]
        await asyncio.sleep(0.05)
        work += [asyncio.ensure_future(batcher.submit(TaskRequest(a, a_head, [f"a{i}"]))) for i in range(9)]
        await asyncio.sleep(0.01)
        work.append(asyncio.ensure_future(batcher.submit(TaskRequest(b, b_head, ["b0"]))))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*work)
        await batcher.stop()

    asyncio.run(scenario())
    assert batches[0] == ["a~t"]
    assert batches[1] == ["a~t", "b~t", "a~t"], "b's request waited behind a's backlog"
