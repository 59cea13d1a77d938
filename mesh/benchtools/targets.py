"""Request factories for the load generator: one tritonclient aio client, inputs built once, reused."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh.benchtools.load import LoadResult, closed_loop


@dataclass(frozen=True)
class Workload:
    """One model's request: input name, datatype, row shape (without the batch dim) and data maker."""

    model: str
    input_name: str
    datatype: str
    row_shape: tuple[int, ...]
    output_name: str

    def data(self, batch: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        shape = (batch, *self.row_shape)
        if self.datatype == "FP32":
            return rng.integers(0, 17, shape).astype(np.float32)
        if self.datatype == "INT64":
            return rng.integers(0, 30522, shape).astype(np.int64)
        raise ValueError(f"datatype {self.datatype} not supported by the benchmark")


WORKLOADS = {
    "digits": Workload("digits", "pixels", "FP32", (64,), "logits"),
    "encoder": Workload("encoder", "input_ids", "INT64", (128,), "embedding"),
    # The bare echo server answers any model name and returns its input.
    "echo": Workload("echo", "pixels", "FP32", (64,), "pixels"),
}


def infer_call(
    client: Any,
    workload: Workload,
    *,
    model: str = "",
    version: str = "",
    batch: int = 1,
    token: str | None = None,
) -> Callable[[], Awaitable[object]]:
    """A zero-argument coroutine factory sending the same request each time (tritonclient.grpc.aio)."""
    import tritonclient.grpc.aio as aioclient

    tensor = aioclient.InferInput(workload.input_name, [batch, *workload.row_shape], workload.datatype)
    tensor.set_data_from_numpy(workload.data(batch))
    outputs = [aioclient.InferRequestedOutput(workload.output_name)]
    headers = {"authorization": f"Bearer {token}"} if token else None
    name = model or workload.model

    async def call() -> object:
        return await client.infer(name, [tensor], model_version=version, outputs=outputs, headers=headers)

    return call


async def sweep(
    url: str,
    workload: Workload,
    concurrencies: list[int],
    *,
    model: str = "",
    version: str = "",
    duration_s: float = 3.0,
    warmup_s: float = 0.5,
    max_requests: int | None = None,
    token: str | None = None,
    on_point: Callable[[LoadResult], None] | None = None,
) -> list[LoadResult]:
    """Closed-loop load at each concurrency against url, one client (one channel) for the sweep."""
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    results = []
    try:
        call = infer_call(client, workload, model=model, version=version, token=token)
        await call()  # fail fast (and connect) before measuring
        for c in concurrencies:
            result = await closed_loop(
                call, c, duration_s=duration_s, warmup_s=warmup_s, max_requests=max_requests
            )
            results.append(result)
            if on_point is not None:
                on_point(result)
            await asyncio.sleep(0.2)
    finally:
        await client.close()
    return results
