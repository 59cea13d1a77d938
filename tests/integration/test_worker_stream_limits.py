"""A worker's streams hold bounded work: ModelStreamInfer's requests in flight and queued responses, a
decoupled generation whose client does not read, the gateway's multiplexed stream, and the deadlines
of streamed (decoupled) requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from gateway.upstream import WorkerLink
from mesh import codec
from mesh.server import open_channel
from mesh.store import ArtifactStore
from mesh.v2 import pb, pb_grpc
from tests.integration.test_worker import pixels, reference
from tests.integration.test_worker_mux import request_bytes, until
from tests.integration.test_worker_support import (
    export_mlp,
    mlp_record,
    save_tinylm,
    standalone_worker,
    tinylm_record,
)
from workers.service import GENERATE_WINDOW, ServedVersion

LIMIT = 4
# A client whose HTTP/2 receive window stays small (no BDP probing to grow it): when it does not read,
# its transport soon refuses more data and the worker's writes wait, as over a slow network.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream-limits")
    return {"mlp": export_mlp(root / "mlp.pt2"), "tinylm": save_tinylm(root / "tinylm.pt")}


def mlp_request(x: np.ndarray, request_id: str) -> pb.ModelInferRequest:
    return codec.encode_request(pb.ModelInferRequest(model_name="mlp", id=request_id), {"pixels": x})


def prompt_inputs(max_tokens: int) -> dict[str, np.ndarray]:
    return {"prompt": np.array([b"hello "], dtype=object), "max_tokens": np.array([max_tokens], np.int32)}


def prompt_request(max_tokens: int, request_id: str, timeout_us: int = 0) -> pb.ModelInferRequest:
    request = codec.encode_request(
        pb.ModelInferRequest(model_name="tinylm", id=request_id), prompt_inputs(max_tokens)
    )
    if timeout_us:
        request.parameters["timeout"].int64_param = timeout_us
    return request


def max_batch(sv: ServedVersion) -> int:
    return max(sv.stats.batches)


async def test_stream_holds_at_most_its_bound_of_requests(
    store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    """Six times the bound sent at once, nothing read until all are written: the worker takes LIMIT at a
    time. A 100 ms batching delay merges whatever reached the batcher, so no batch may exceed LIMIT."""
    async with standalone_worker(store, stream_max_in_flight=LIMIT) as app:
        sv = await app.manager.load(mlp_record(store, artifacts["mlp"], delay_us=100_000))
        xs = [pixels(1, seed=i) for i in range(6 * LIMIT)]
        async with open_channel(app.address) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(timeout=60)
            for i, x in enumerate(xs):
                request = mlp_request(x, str(i))
                if i % 5 == 4:  # a bad request answers with an error_message and frees its place too
                    request.inputs[0].name = "nope"
                await call.write(request)
            await call.done_writing()
            responses = [r async for r in call]
    assert sorted(int(r.infer_response.id) for r in responses) == list(range(len(xs)))
    for r in responses:
        i = int(r.infer_response.id)
        if i % 5 == 4:
            assert "nope" in r.error_message
            continue
        assert not r.error_message, r.error_message
        logits = np.frombuffer(r.infer_response.raw_output_contents[0], np.float32).reshape(1, 10)
        np.testing.assert_allclose(logits, reference(xs[i]), rtol=1e-5, atol=1e-5)
    assert sv.stats.execution_count >= (len(xs) - len(xs) // 5) // LIMIT
    assert max_batch(sv) <= LIMIT, sorted(sv.stats.batches)


def counting(sv: ServedVersion) -> list[int]:
    """Counts the responses the version's model generates (patched on its runtime)."""
    count = [0]
    generate = sv.runtime.generate

    def counted(inputs: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for out in generate(inputs):
            count[0] += 1
            yield out

    sv.runtime.generate = counted  # type: ignore[method-assign]
    return count


async def test_generation_pauses_while_the_client_does_not_read(
    store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    """The client sends twice the bound of long generations and reads nothing. With one compute thread, a
    job queued behind the model runs only when generation gives the thread back: each time it looks, the
    responses generated stay within what the stream may hold (without the bound, generation ran on until
    a whole request was done). Then the client reads everything, and every request's text is whole."""
    async with standalone_worker(store, stream_max_in_flight=LIMIT, compute_threads=1) as app:
        sv = await app.manager.load(tinylm_record(store, artifacts["tinylm"]))
        expected = await asyncio.to_thread(
            lambda: b"".join(bytes(out["text"][0]) for out in sv.runtime.generate(prompt_inputs(1024)))
        )
        per_request = 1024 // 4  # chunks of 4 characters
        count = counting(sv)
        # Requests in flight, each with a window of responses ahead of it, one held back for the final
        # flag and one waiting for a place in the queue; the queue; what the small windows let through.
        bound = LIMIT * (GENERATE_WINDOW + 2) + LIMIT + 64
        loop = asyncio.get_running_loop()
        async with open_channel(app.address, options=SMALL_WINDOW) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(timeout=120)
            for i in range(2 * LIMIT):
                await call.write(prompt_request(1024, str(i)))
            for _ in range(40):
                seen = await loop.run_in_executor(app.manager.executor, lambda: count[0])
                assert seen <= bound
            assert sv.streams <= LIMIT
            await call.done_writing()
            texts: dict[str, bytes] = {}
            finals = 0
            async for r in call:
                assert not r.error_message, r.error_message
                resp = r.infer_response
                if resp.raw_output_contents:
                    (text,) = codec.deserialize_bytes(resp.raw_output_contents[0], 1)
                    texts[resp.id] = texts.get(resp.id, b"") + text
                finals += resp.parameters["triton_final_response"].bool_param
        assert finals == 2 * LIMIT
        assert texts == {str(i): expected for i in range(2 * LIMIT)}
        assert count[0] == 2 * LIMIT * per_request


async def test_a_cancelled_stream_frees_its_paused_generations(
    store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    async with standalone_worker(store, stream_max_in_flight=LIMIT) as app:
        sv = await app.manager.load(tinylm_record(store, artifacts["tinylm"]))
        async with open_channel(app.address, options=SMALL_WINDOW) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(timeout=60)
            for i in range(2 * LIMIT):
                await call.write(prompt_request(2048, str(i)))
            await until(lambda: sv.streams == LIMIT, "the stream's bound of generations to start")
            call.cancel()
            await until(lambda: sv.streams == 0, "the cancelled stream's generations to end", 10)
        assert app.manager.in_flight() == 0
        async with open_channel(app.address) as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(timeout=60)
            await call.write(prompt_request(8, "after"))
            await call.done_writing()
            responses = [r async for r in call]
        assert responses and not any(r.error_message for r in responses)
        assert responses[-1].infer_response.parameters["triton_final_response"].bool_param


async def _stream(
    channel: grpc.aio.Channel, requests: list[pb.ModelInferRequest], **kw: Any
) -> tuple[list[pb.ModelStreamInferResponse], grpc.aio.AioRpcError | None]:
    """Sends `requests`, half-closes, reads to the end: the responses and the error that ended it."""
    call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(**kw)
    responses: list[pb.ModelStreamInferResponse] = []
    try:
        for request in requests:
            await call.write(request)
        await call.done_writing()
        async for r in call:
            responses.append(r)
    except grpc.aio.AioRpcError as exc:
        return responses, exc
    return responses, None


async def test_decoupled_requests_keep_their_deadlines(
    store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    """2048 characters would take 512 responses; the `timeout` parameter (100 ms) or the stream's own
    deadline ends the generation early, reported like any other failed request of the stream."""
    async with standalone_worker(store) as app:
        sv = await app.manager.load(tinylm_record(store, artifacts["tinylm"]))
        async with open_channel(app.address) as channel:
            # The parameter: an error_message on the open stream, which then answers the next request.
            requests = [prompt_request(2048, "late", timeout_us=100_000), prompt_request(8, "next")]
            responses, error = await _stream(channel, requests, timeout=60)
            assert error is None
            late = [r for r in responses if r.infer_response.id == "late"]
            assert len(late) < 2048 // 4
            assert "deadline exceeded" in late[-1].error_message and "timeout" in late[-1].error_message
            assert not any(r.error_message for r in late[:-1])
            following = [r for r in responses if r.infer_response.id == "next"]
            assert following and not any(r.error_message for r in following)

            # With `triton_grpc_error: true` it ends the stream with DEADLINE_EXCEEDED instead.
            responses, error = await _stream(
                channel,
                [prompt_request(2048, "late", timeout_us=100_000)],
                timeout=60,
                metadata=(("triton_grpc_error", "true"),),
            )
            assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "timeout" in (error.details() or "")
            assert len(responses) < 2048 // 4

            # The stream's gRPC deadline bounds its generations too: the request fails at that deadline
            # (the stream, half-closed and answered, then ends), unless gRPC ends the call first.
            responses, error = await _stream(channel, [prompt_request(2048, "call")], timeout=0.3)
            if error is None:
                assert "deadline exceeded" in responses[-1].error_message
            else:
                assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert len(responses) < 2048 // 4
        await until(lambda: sv.streams == 0, "the generations to stop")
        assert sv.stats.fail.count == 3


async def test_multiplexed_stream_holds_at_most_its_bound(
    store: ArtifactStore, artifacts: dict[str, Path]
) -> None:
    """The gateway's stream (maas.v1.WorkerInference) has a bound of its own: six times as many frames
    at once all answer, and the batcher never sees more than the bound of them together."""
    async with standalone_worker(store, mux_max_in_flight=LIMIT) as app:
        sv = await app.manager.load(mlp_record(store, artifacts["mlp"], delay_us=100_000))
        xs = [pixels(1, seed=i) for i in range(6 * LIMIT)]
        async with open_channel(app.address) as channel:
            link = WorkerLink(channel, app.address)
            try:
                outs = await asyncio.gather(
                    *(link.infer(request_bytes(x, f"r{i}"), 30.0, f"r{i}") for i, x in enumerate(xs))
                )
            finally:
                await link.close()
        for x, data in zip(xs, outs, strict=True):
            resp = pb.ModelInferResponse.FromString(data)
            logits = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(1, 10)
            np.testing.assert_allclose(logits, reference(x), rtol=1e-5, atol=1e-5)
        assert sv.stats.execution_count >= len(xs) // LIMIT
        assert max_batch(sv) <= LIMIT, sorted(sv.stats.batches)
