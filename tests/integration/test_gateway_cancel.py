"""Cancellation and deadlines through the gateway reach the worker: a cancelled or expired request leaves the
worker's queue (its slot is freed) and is never computed. Real router + worker + gateway in-process, real
Redis, tritonclient (aio and sync) as the client.

The model is a `module_state` whose forward blocks on a gate the test opens: while request A holds the
version's only compute slot, request B waits in the worker's queue, and the test can watch it leave."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from torch import nn
from tritonclient.utils import InferenceServerException

from mesh.store import ArtifactStore
from mesh_pb import common_pb2, registry_pb2
from tests.integration.gateway_stack import Stack, running_stack, wait_routable, wait_until
from workers.models import ARCHS, save_module_state
from workers.service import ServedVersion

ARCH = "test_gated_double"
MODEL = "gated"
GATES: dict[str, threading.Event] = {}
GATE_TIMEOUT_S = 30.0  # a forward never blocks longer than this, whatever the test does


class GatedDouble(nn.Module):
    """y = 2x, once the gate named in its config is open."""

    arch = ARCH

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        GATES[self.config["gate"]].wait(GATE_TIMEOUT_S)
        return x * self.get_buffer("scale")


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = GATES.setdefault("main", threading.Event())
    event.clear()
    ARCHS[ARCH] = GatedDouble
    try:
        yield event
    finally:
        event.set()  # never leave a compute thread blocked
        ARCHS.pop(ARCH, None)


@pytest.fixture(params=["stream", "unary"])
async def stack(
    request: pytest.FixtureRequest,
    redis_url: str,
    prefix: str,
    store: ArtifactStore,
    tmp_path: Path,
    gate: threading.Event,
) -> AsyncIterator[Stack]:
    # Both upstream paths: frames on the multiplexed stream (cancel frames) and one v2 call per request.
    # Two calls in flight per worker, so that request B reaches the worker's queue behind A (with one,
    # B would wait in the gateway's coalescing queue instead).
    async with running_stack(
        redis_url, prefix, store, upstream=request.param, coalesce_inflight_per_worker=2
    ) as s:
        path = save_module_state(GatedDouble({"gate": "main"}), tmp_path / "gated.pt")
        art = store.put_file(MODEL, "1", path, "model.pt")
        sig = common_pb2.Signature(
            inputs=[common_pb2.TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
            outputs=[common_pb2.TensorSpec(name="y", datatype="FP32", shape=[-1, 4])],
            max_batch_size=8,
        )
        mv = await s.registry.register_version(
            registry_pb2.RegisterVersionRequest(
                model=MODEL,
                artifact_uri=art.uri,
                sha256=art.sha256,
                format="module_state",
                signature=sig,
                batching=common_pb2.BatchingConfig(enabled=True, max_queue_delay_us=0),
                dtype="fp32",
                state=common_pb2.READY,
                min_replicas=1,
            )
        )
        await wait_routable(s.gateway, MODEL, int(mv.ref.version))
        try:
            yield s
        finally:
            gate.set()


def served(s: Stack) -> ServedVersion:
    return s.workers[0].manager.get(MODEL, "1")


def x_of(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 4)).astype(np.float32)


def inputs(x: np.ndarray, module: Any = tca) -> list[Any]:
    inp = module.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


async def hold_the_slot(s: Stack, client: tca.InferenceServerClient, x: np.ndarray) -> asyncio.Task[Any]:
    """Request A: computing on the worker (blocked on the gate), so later requests queue behind it."""
    task = asyncio.create_task(client.infer(MODEL, inputs(x), model_version="1"))
    await wait_until(lambda: served(s).batcher.in_flight == 1, 20, "request A computing on the worker")
    return task


async def finish_and_count(
    s: Stack, gate: threading.Event, task_a: asyncio.Task[Any], x_a: np.ndarray
) -> None:
    """Opens the gate: A answers 2x; once the worker is idle, only A was ever computed."""
    gate.set()
    result = await asyncio.wait_for(task_a, 20)
    np.testing.assert_array_equal(result.as_numpy("y"), x_a * 2)
    sv = served(s)
    await wait_until(lambda: sv.busy == 0, 10, "the worker's version idle")
    stats = s.workers[0].manager.worker_stats()
    assert [(r.queue_depth, r.in_flight) for r in stats.loaded] == [(0, 0)]
    direct = tca.InferenceServerClient(s.workers[0].address)
    try:
        st = (await direct.get_inference_statistics(MODEL, "1", as_json=True))["model_stats"][0]
    finally:
        await direct.close()
    assert int(st["execution_count"]) == 1 and int(st["inference_count"]) == len(x_a)


async def test_aio_client_cancel_frees_the_worker_slot(stack: Stack, gate: threading.Event) -> None:
    client = tca.InferenceServerClient(stack.gateway.address)
    try:
        x_a = x_of(2, seed=1)
        task_a = await hold_the_slot(stack, client, x_a)
        sv = served(stack)
        task_b = asyncio.create_task(client.infer(MODEL, inputs(x_of(3, seed=2)), model_version="1"))
        await wait_until(lambda: sv.batcher.queue_depth == 1, 20, "request B queued on the worker")

        task_b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task_b
        # The gateway cancelled its upstream call: B left the worker's queue while A still computes.
        await wait_until(lambda: sv.batcher.queue_depth == 0, 10, "request B to leave the worker's queue")
        assert sv.batcher.in_flight == 1
        await finish_and_count(stack, gate, task_a, x_a)
    finally:
        await client.close()


async def test_sync_client_cancel_frees_the_worker_slot(stack: Stack, gate: threading.Event) -> None:
    aio_client = tca.InferenceServerClient(stack.gateway.address)
    client = tc.InferenceServerClient(stack.gateway.address)
    try:
        x_a = x_of(1, seed=3)
        task_a = await hold_the_slot(stack, aio_client, x_a)
        sv = served(stack)
        outcome: queue.Queue[Any] = queue.Queue()
        call = client.async_infer(
            MODEL, inputs(x_of(2, seed=4), tc), lambda result, error: outcome.put((result, error)),
            model_version="1",
        )  # fmt: skip
        await wait_until(lambda: sv.batcher.queue_depth == 1, 20, "request B queued on the worker")

        call.cancel()
        result, error = await asyncio.to_thread(outcome.get, True, 10)
        assert result is None and isinstance(error, InferenceServerException)
        assert error.status() == "StatusCode.CANCELLED"
        await wait_until(lambda: sv.batcher.queue_depth == 0, 10, "request B to leave the worker's queue")
        assert sv.batcher.in_flight == 1
        await finish_and_count(stack, gate, task_a, x_a)
    finally:
        client.close()
        await aio_client.close()


async def test_client_deadline_reaches_the_worker(stack: Stack, gate: threading.Event) -> None:
    client = tca.InferenceServerClient(stack.gateway.address)
    try:
        x_a = x_of(2, seed=5)
        task_a = await hold_the_slot(stack, client, x_a)
        sv = served(stack)
        # B's deadline is shorter than the work ahead of it (A holds the slot until the gate opens).
        with pytest.raises(InferenceServerException) as err:
            await client.infer(MODEL, inputs(x_of(1, seed=6)), model_version="1", client_timeout=1.0)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        # The worker stopped B: it left the queue without being computed.
        await wait_until(lambda: sv.batcher.queue_depth == 0, 10, "request B to leave the worker's queue")
        assert sv.batcher.in_flight == 1

        # A deadline that expires while the request is still inside the worker's queue is answered by
        # the worker itself (DEADLINE_EXCEEDED, relayed by the gateway) even without a client deadline.
        with pytest.raises(InferenceServerException) as err:
            await asyncio.wait_for(
                client.infer(MODEL, inputs(x_of(1, seed=7)), model_version="1", timeout=300_000),
                20,
            )
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        await wait_until(lambda: sv.batcher.queue_depth == 0, 10, "request C to leave the worker's queue")
        await finish_and_count(stack, gate, task_a, x_a)
    finally:
        await client.close()
