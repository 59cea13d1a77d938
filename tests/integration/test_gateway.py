"""Gateway end to end: tritonclient → gateway → real worker, metadata, errors, coalescing, streams, versions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as aioclient
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from gateway.coalesce import merge_key, merge_requests, split_response
from mesh.codec import encode_request, encode_response, serialize_bytes
from mesh.store import ArtifactStore
from mesh.testing import delete_prefix, unique_prefix
from mesh.v2 import pb, pb_grpc
from router.picker import request_fraction
from tests.integration.gateway_stack import (
    Artifacts,
    Stack,
    make_artifacts,
    register_digits,
    register_tinylm,
    running_stack,
    wait_routable,
    wait_until,
)
from workers.models import load_module_state

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Env:
    stack: Stack
    art: Artifacts
    client: aioclient.InferenceServerClient
    digits: int
    tinylm: int
    canary: tuple[int, int]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("gateway")
    art = make_artifacts(tmp)
    store = ArtifactStore(tmp / "store")
    prefix = unique_prefix()
    try:
        async with running_stack(redis_url, prefix, store) as stack:
            reg = stack.registry
            digits = await register_digits(reg, store, art)
            tinylm = await register_tinylm(reg, store, art)
            c1 = await register_digits(reg, store, art, model="canary")
            c2 = await register_digits(reg, store, art, model="canary")
            await reg.set_alias("canary", "stable", c1)
            await reg.set_traffic("canary", [(c1, 90.0), (c2, 10.0)])
            for model, v in (("digits", digits), ("tinylm", tinylm), ("canary", c1), ("canary", c2)):
                await wait_routable(stack.gateway, model, v)
            await wait_until(
                lambda: any(
                    m.model == "canary" and len(m.traffic) == 2 for m in stack.gateway.picker.table.models
                ),
                10,
                "canary traffic in the table",
            )
            client = aioclient.InferenceServerClient(stack.gateway.address)
            try:
                yield Env(stack, art, client, digits, tinylm, (c1, c2))
            finally:
                await client.close()
    finally:
        delete_prefix(redis_url, prefix)


def pixels(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, (batch, 64)).astype(np.float32)


def digits_input(x: np.ndarray, name: str = "pixels", datatype: str = "FP32") -> aioclient.InferInput:
    inp = aioclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


async def test_infer_matches_reference_and_echoes(env: Env) -> None:
    x = pixels(3)
    result = await env.client.infer("digits", [digits_input(x)], request_id="req-1")
    np.testing.assert_allclose(result.as_numpy("logits"), env.art.digits_reference(x), rtol=1e-5, atol=1e-5)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-1", "digits", str(env.digits))
    pinned = await env.client.infer("digits", [digits_input(x)], model_version=str(env.digits))
    assert pinned.get_response().model_version == str(env.digits)


async def test_health_metadata_config_statistics_index(env: Env) -> None:
    c = env.client
    assert await c.is_server_live() and await c.is_server_ready()
    meta = await c.get_server_metadata()
    assert meta.name == "maas-mesh"
    assert "model_configuration" in meta.extensions and "statistics" in meta.extensions
    assert "system_shared_memory" not in meta.extensions
    assert await c.is_model_ready("digits") and await c.is_model_ready("digits", str(env.digits))
    assert not await c.is_model_ready("no-such-model")

    md = await c.get_model_metadata("digits")
    assert md.platform == "pytorch" and md.versions == [str(env.digits)]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("pixels", "FP32", [-1, 64])]
    assert [(t.name, list(t.shape)) for t in md.outputs] == [("logits", [-1, 10])]

    cfg = (await c.get_model_config("digits")).config
    assert cfg.name == "digits" and cfg.max_batch_size == 64 and cfg.platform == "pytorch"
    assert [list(i.dims) for i in cfg.input] == [[64]] and [list(o.dims) for o in cfg.output] == [[10]]
    assert cfg.HasField("dynamic_batching") and not cfg.model_transaction_policy.decoupled
    assert list(cfg.version_policy.specific.versions) == [env.digits]
    lm_cfg = (await c.get_model_config("tinylm")).config
    assert lm_cfg.model_transaction_policy.decoupled and lm_cfg.max_batch_size == 0

    await c.infer("digits", [digits_input(pixels(2))])
    stats = (await c.get_inference_statistics("digits")).model_stats
    assert [s.name for s in stats] == ["digits"] and stats[0].inference_count >= 2
    s = stats[0].inference_stats
    assert s.compute_input.count == s.compute_infer.count == s.compute_output.count > 0

    index = await c.get_model_repository_index()
    states = {(m.name, m.version): m.state for m in index.models}
    assert states[("digits", str(env.digits))] == "READY"
    assert states[("tinylm", str(env.tinylm))] == "READY"


async def test_errors_name_the_field(env: Env) -> None:
    c = env.client

    async def code_of(coro: object) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as info:
            await coro  # type: ignore[misc]
        return str(info.value.status()), str(info.value.message())

    code, msg = await code_of(c.infer("no-such-model", [digits_input(pixels(1))]))
    assert code == "StatusCode.NOT_FOUND" and "no-such-model" in msg
    code, msg = await code_of(c.infer("digits", [digits_input(pixels(1))], model_version="99"))
    assert code == "StatusCode.NOT_FOUND" and "model_version" in msg
    code, msg = await code_of(
        c.infer("digits", [digits_input(pixels(1).astype(np.float64), datatype="FP64")])
    )
    assert code == "StatusCode.INVALID_ARGUMENT" and "inputs[0]" in msg and "datatype" in msg
    code, msg = await code_of(c.infer("digits", [digits_input(np.zeros((1, 63), np.float32))]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "inputs[0] ('pixels').shape" in msg
    code, msg = await code_of(c.infer("digits", [digits_input(pixels(1), name="pixelz")]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "name" in msg
    code, msg = await code_of(c.infer("digits", [digits_input(pixels(65))]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "max_batch_size" in msg
    prompt = aioclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"hi"], dtype=object))
    code, msg = await code_of(c.infer("tinylm", [prompt]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "ModelStreamInfer" in msg
    code, _ = await code_of(c.get_system_shared_memory_status())
    assert code == "StatusCode.UNIMPLEMENTED"
    code, _ = await code_of(c.load_model("no-such-model"))
    assert code == "StatusCode.NOT_FOUND"


# str.isdigit() takes the first, int() takes the next two as 1, and int() refuses the 4301-digit one.
_UNPARSEABLE_VERSIONS = ["²", "１", "١", "abc", "9" * 4301, "-1", " 1", str(2**63)]


async def test_unparseable_versions_are_invalid_argument(env: Env) -> None:
    c = env.client
    x = pixels(1)

    async def code_of(coro: object) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as info:
            await coro  # type: ignore[misc]
        return str(info.value.status()), str(info.value.message())

    for version in _UNPARSEABLE_VERSIONS:
        for what, call in (
            ("infer", c.infer("digits", [digits_input(x)], model_version=version)),
            ("ready", c.is_model_ready("digits", version)),
            ("metadata", c.get_model_metadata("digits", version)),
            ("config", c.get_model_config("digits", version)),
            ("statistics", c.get_inference_statistics("digits", version)),
        ):
            code, msg = await code_of(call)
            assert code == "StatusCode.INVALID_ARGUMENT" and msg.startswith("model_version:"), (what, msg)
            assert len(msg) < 200  # the 4301-digit string is not echoed back whole

    # On a stream each bad version is that request's error; the stream and the other requests go on.
    async def source() -> AsyncIterator[dict[str, object]]:
        for i, version in enumerate([*_UNPARSEABLE_VERSIONS, str(env.digits)]):
            yield {
                "model_name": "digits",
                "inputs": [digits_input(x)],
                "model_version": version,
                "request_id": str(i),
            }

    answered, errors = [], []
    async for result, error in c.stream_infer(source()):
        if error is not None:
            errors.append(str(error))
        else:
            answered.append(result.get_response().id)
    assert answered == [str(len(_UNPARSEABLE_VERSIONS))]
    assert len(errors) == len(_UNPARSEABLE_VERSIONS) and all("model_version:" in e for e in errors), errors

    # Well-formed versions keep their meaning: a missing one is NOT_FOUND, the largest int64 included.
    for version in ("99", str(2**63 - 1)):
        code, msg = await code_of(c.infer("digits", [digits_input(x)], model_version=version))
        assert code == "StatusCode.NOT_FOUND" and "model_version" in msg
    assert not await c.is_model_ready("digits", "99")
    # ... and the gateway still serves, with a pinned version and without one.
    pinned = await c.infer("digits", [digits_input(x)], model_version=str(env.digits))
    assert pinned.get_response().model_version == str(env.digits)
    assert await c.is_model_ready("digits", str(env.digits))
    await c.infer("digits", [digits_input(x)])


def _coalesced_calls() -> tuple[float, float]:
    count = REGISTRY.get_sample_value("maas_gateway_coalesced_requests_count", {"model": "digits"}) or 0.0
    total = REGISTRY.get_sample_value("maas_gateway_coalesced_requests_sum", {"model": "digits"}) or 0.0
    return count, total


async def _digits_counts(env: Env) -> tuple[int, int, int]:
    """(success requests, compute_infer requests, executions) of digits in the gateway's statistics."""
    stats = await env.client.get_inference_statistics("digits", str(env.digits))
    (s,) = stats.model_stats
    return s.inference_stats.success.count, s.inference_stats.compute_infer.count, s.execution_count


async def test_statistics_by_alias_name_the_version_and_config_matches_a_worker(env: Env) -> None:
    # Statistics asked by alias answer with the version number (perf_analyzer parses it as a number).
    c1, _ = env.canary
    by_alias = await env.client.get_inference_statistics("canary", "stable")
    assert [s.version for s in by_alias.model_stats] == [str(c1)]
    config = (await env.client.get_model_config("digits")).config
    assert config.dynamic_batching.default_queue_policy.allow_timeout_override
    assert [g.name for g in config.instance_group] == ["digits_0"]


async def test_coalesced_requests_equal_single_requests(env: Env) -> None:
    calls_before, merged_before = _coalesced_calls()
    counts_before = await _digits_counts(env)
    batches = [1 + (i % 4) for i in range(48)]
    inputs = [pixels(b, seed=100 + i) for i, b in enumerate(batches)]
    assert env.stack.gateway is not None
    async with grpc.aio.insecure_channel(env.stack.gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def like_perf_analyzer(i: int, x: np.ndarray) -> pb.ModelInferResponse:
            # Triton's perf_analyzer sends this parameter on every ModelInfer (tritonclient refuses to):
            # such requests merge with the others.
            request = encode_request(pb.ModelInferRequest(model_name="digits", id=f"c{i}"), {"pixels": x})
            request.parameters["triton_enable_empty_final_response"].bool_param = True
            response: pb.ModelInferResponse = await stub.ModelInfer(request)
            return response

        async def one(i: int, x: np.ndarray) -> tuple[str, np.ndarray]:
            if i % 2:
                raw = await like_perf_analyzer(i, x)
                return raw.id, np.frombuffer(raw.raw_output_contents[0], np.float32).reshape(-1, 10)
            r = await env.client.infer("digits", [digits_input(x)], request_id=f"c{i}")
            return r.get_response().id, r.as_numpy("logits")

        results = await asyncio.gather(*(one(i, x) for i, x in enumerate(inputs)))
        for i, (x, (rid, logits)) in enumerate(zip(inputs, results, strict=True)):
            assert rid == f"c{i}"
            np.testing.assert_allclose(logits, env.art.digits_reference(x), rtol=1e-5, atol=1e-5)
        calls, merged = _coalesced_calls()
        # 48 requests at once cannot all find a free upstream slot: some were merged into shared calls.
        assert merged - merged_before > calls - calls_before > 0
        # The statistics count the clients' requests, as Triton's do (perf_analyzer compares them with
        # what it sent), and the model's executions apart.
        counts = await _digits_counts(env)
        success, computed, executions = (a - b for a, b in zip(counts, counts_before, strict=True))
        assert success == computed == 48, (success, computed)
        assert executions < 48
        # By default a CPU worker gets one upstream call in flight per version (more queue and merge).
        service = env.stack.gateway.service
        assert [e.device for e in env.stack.gateway.picker.version_info("digits", env.digits).endpoints] == [
            "cpu"
        ]
        assert service._max_inflight(("digits", env.digits)) == 1
        # Only perf_analyzer-shaped requests: they merge as well.
        await asyncio.gather(*(like_perf_analyzer(i, x) for i, x in enumerate(inputs)))
        calls_after, merged_after = _coalesced_calls()
        assert merged_after - merged > calls_after - calls > 0


async def test_merge_and_split_round_trip_with_bytes_outputs() -> None:
    requests = []
    for i, b in enumerate((1, 3, 2)):
        r = pb.ModelInferRequest(model_name="m", model_version="1", id=f"r{i}")
        t = r.inputs.add(name="x", datatype="INT32", shape=[b, 2])
        r.raw_input_contents.append(np.arange(b * 2, dtype=np.int32).tobytes())
        r.outputs.add(name="y")
        assert t is not None
        requests.append(r)
    keys = [merge_key(r) for r in requests]
    assert all(k is not None and k[0] == keys[0][0] for k in keys)  # type: ignore[index]
    merged = merge_requests(requests, 6)
    assert list(merged.inputs[0].shape) == [6, 2]
    assert merged.raw_input_contents[0] == b"".join(r.raw_input_contents[0] for r in requests)
    words = np.array([f"w{i}" * (i + 1) for i in range(12)], dtype=object).reshape(6, 2)
    nums = np.arange(6, dtype=np.float32).reshape(6, 1)
    response = encode_response(
        pb.ModelInferResponse(model_name="m", model_version="1"), [("y", words, "BYTES"), ("z", nums)]
    )
    parts = split_response(response, requests, [1, 3, 2])
    assert [p.id for p in parts] == ["r0", "r1", "r2"]
    assert parts[1].raw_output_contents[0] == serialize_bytes(words[1:4])
    assert list(parts[2].outputs[1].shape) == [2, 1]
    assert parts[2].raw_output_contents[1] == nums[4:6].tobytes()
    with_params = pb.ModelInferRequest()
    with_params.CopyFrom(requests[0])
    with_params.parameters["priority"].uint64_param = 1
    assert merge_key(with_params) is None
    # perf_analyzer sends this on every unary request; it does not change the request's computation.
    neutral = pb.ModelInferRequest()
    neutral.CopyFrom(requests[0])
    neutral.parameters["triton_enable_empty_final_response"].bool_param = True
    assert merge_key(neutral) == keys[0]
    neutral.parameters["priority"].uint64_param = 1
    assert merge_key(neutral) is None


async def test_short_client_deadlines_do_not_fail_other_clients(env: Env) -> None:
    # Impatient clients (deadlines of a few ms, many expiring while their frame is being written to the
    # worker's shared stream) get DEADLINE_EXCEEDED or an answer; a patient client alongside gets only
    # answers, and no worker is ejected.
    gateway = env.stack.gateway
    stop = time.monotonic() + 1.5
    impatient_codes: dict[str, int] = {}

    async def impatient(seed: int) -> None:
        x = pixels(64, seed=seed)
        while time.monotonic() < stop:
            try:
                await env.client.infer(
                    "digits", [digits_input(x)], client_timeout=0.002 + 0.0015 * (seed % 6)
                )
                code = "OK"
            except InferenceServerException as exc:
                code = str(exc.status())
            impatient_codes[code] = impatient_codes.get(code, 0) + 1

    async def patient() -> int:
        n = 0
        while time.monotonic() < stop:
            x = pixels(1, seed=n)
            result = await env.client.infer("digits", [digits_input(x)])
            np.testing.assert_allclose(
                result.as_numpy("logits"), env.art.digits_reference(x), rtol=1e-5, atol=1e-5
            )
            n += 1
        return n

    *_, answered = await asyncio.gather(*(impatient(i) for i in range(12)), patient())
    assert answered > 0
    assert set(impatient_codes) <= {"OK", "StatusCode.DEADLINE_EXCEEDED"}, impatient_codes
    assert impatient_codes.get("StatusCode.DEADLINE_EXCEEDED", 0) > 0
    assert not [w.worker_id for w in env.stack.workers if gateway.picker.is_ejected(w.worker_id)]


def _tinylm_request(prompt: str, max_tokens: int, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tinylm", id=request_id)
    encode_request(
        request,
        [
            ("prompt", np.array([prompt.encode()], dtype=object), "BYTES"),
            ("max_tokens", np.array([max_tokens], np.int32)),
        ],
    )
    return request


async def test_a_client_ending_its_stream_early_ejects_no_worker(env: Env) -> None:
    # A cancelled stream, one whose deadline passes mid-generation, and one that ends on a request's
    # own error (triton_grpc_error) are the client's doing: the worker stays in use for everyone.
    gateway = env.stack.gateway
    workers = [w.worker_id for w in env.stack.workers]
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def requests(*items: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferRequest]:
            for item in items:
                yield item
            await asyncio.sleep(30)  # keep the stream open: the client ends it, not the request list

        cancelled = stub.ModelStreamInfer(requests(_tinylm_request("the mesh", 400, "c1")))
        first = await cancelled.read()
        assert first.infer_response.id == "c1" and not first.error_message
        cancelled.cancel()

        expired = stub.ModelStreamInfer(requests(_tinylm_request("the mesh", 400, "d1")), timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in expired:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        bad = _tinylm_request("x", 4, "e1")
        bad.raw_input_contents[0] = b"\xff\xff\xff\x7f"  # a BYTES length prefix past the end
        ended = stub.ModelStreamInfer(requests(bad), metadata=(("triton_grpc_error", "true"),))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in ended:
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        await asyncio.sleep(0.3)  # the upstream streams wind down
        assert not [w for w in workers if gateway.picker.is_ejected(w)]
        x = pixels(2, seed=5)
        result = await env.client.infer("digits", [digits_input(x)])
        np.testing.assert_allclose(
            result.as_numpy("logits"), env.art.digits_reference(x), rtol=1e-5, atol=1e-5
        )


async def test_a_lone_worker_that_failed_once_keeps_serving(env: Env) -> None:
    # A worker that answered UNAVAILABLE or whose stream broke is skipped for a while (eject_s) while
    # another replica can take its requests; the only replica of a version keeps getting them, so one
    # transient failure does not refuse every request for the length of the ejection.
    gateway = env.stack.gateway
    (worker,) = env.stack.workers
    gateway.picker.eject(worker.worker_id, 1.0)  # what a failed forward does
    assert gateway.picker.is_ejected(worker.worker_id)
    x = pixels(2, seed=7)
    result = await env.client.infer("digits", [digits_input(x)])
    np.testing.assert_allclose(result.as_numpy("logits"), env.art.digits_reference(x), rtol=1e-5, atol=1e-5)
    texts, errors, finals = await _stream_texts(env, [("lone-1", "tinylm", "the mesh", 3)])
    assert not errors and finals == {"lone-1": True} and texts["lone-1"]
    await wait_until(lambda: not gateway.picker.is_ejected(worker.worker_id), 5, "the ejection to end")


async def _stream_texts(
    env: Env, requests: list[tuple[str, str, str, int]]
) -> tuple[dict[str, str], list[str], dict[str, bool]]:
    """Sends (id, model, prompt, max_tokens) on one stream; returns texts by id, errors, final flags."""

    async def source() -> AsyncIterator[dict[str, object]]:
        for rid, model, prompt, n in requests:
            p = aioclient.InferInput("prompt", [1], "BYTES")
            p.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
            m = aioclient.InferInput("max_tokens", [1], "INT32")
            m.set_data_from_numpy(np.array([n], dtype=np.int32))
            yield {"model_name": model, "inputs": [p, m], "request_id": rid}

    texts: dict[str, str] = {}
    finals: dict[str, bool] = {}
    errors: list[str] = []
    async for result, error in env.client.stream_infer(source()):
        if error is not None:
            errors.append(str(error))
            continue
        response = result.get_response()
        rid = response.id
        final = response.parameters["triton_final_response"].bool_param
        finals[rid] = finals.get(rid, False) or final
        if response.outputs:
            texts[rid] = texts.get(rid, "") + b"".join(result.as_numpy("text").tolist()).decode()
    return texts, errors, finals


async def test_stream_passes_through_with_final_flags_and_errors(env: Env) -> None:
    lm, _ = load_module_state(env.art.tinylm_path)
    reqs = [("s1", "tinylm", "hello", 9), ("bad", "no-such-model", "x", 3), ("s2", "tinylm", "abc", 6)]

    def streamed(model: str, outcome: str) -> float:
        sample = REGISTRY.get_sample_value(
            "maas_gateway_stream_requests_total", {"model": model, "outcome": outcome}
        )
        return sample or 0.0

    ok_before, unknown_before = streamed("tinylm", "ok"), streamed("_unknown", "error")
    texts, errors, finals = await asyncio.wait_for(_stream_texts(env, reqs), 60)
    # Each streamed request counts once, at its final response; a client's unknown model adds no series.
    assert streamed("tinylm", "ok") - ok_before == 2
    assert streamed("_unknown", "error") - unknown_before == 1
    assert (
        REGISTRY.get_sample_value(
            "maas_gateway_stream_requests_total", {"model": "no-such-model", "outcome": "error"}
        )
        is None
    )
    assert texts["s1"] == "".join(lm.generate("hello", 9))  # type: ignore[operator]
    assert texts["s2"] == "".join(lm.generate("abc", 6))  # type: ignore[operator]
    assert finals == {"s1": True, "s2": True}
    assert len(errors) == 1 and "no-such-model" in errors[0]


async def test_stream_grpc_error_mode_ends_with_the_status(env: Env) -> None:
    """`triton_grpc_error: true`: the first failed request ends the stream with its real status code."""

    async def source() -> AsyncIterator[dict[str, object]]:
        x = pixels(1)
        yield {"model_name": "digits", "inputs": [digits_input(x)], "request_id": "ok"}
        await asyncio.sleep(0.5)  # "ok" answers before the failing request arrives
        yield {"model_name": "no-such-model", "inputs": [digits_input(x)], "request_id": "bad"}
        await asyncio.sleep(30)  # the server ends the stream; this request is never sent

    got: list[tuple[object, object]] = []

    async def run() -> None:
        async for result, error in env.client.stream_infer(source(), headers={"triton_grpc_error": "true"}):
            got.append((result, error))

    # tritonclient's aio stream raises the call's status (its sync client passes it to the callback).
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(run(), 20)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in str(info.value.details())
    assert len(got) == 1 and got[0][1] is None  # "ok" was answered before the stream ended


def _digits_stream_request(request_id: str, x: np.ndarray) -> pb.ModelInferRequest:
    return encode_request(pb.ModelInferRequest(model_name="digits", id=request_id), [("pixels", x)])


def _stream_queued() -> float:
    return REGISTRY.get_sample_value("maas_gateway_stream_queued") or 0.0


async def test_a_stream_client_that_does_not_read_holds_a_bounded_backlog(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client that keeps sending and never reads: the gateway holds at most `stream_max_queued` of its
    # responses and stops reading its workers, instead of buffering every answer.
    gateway = env.stack.gateway
    monkeypatch.setattr(gateway.service, "_stream_max_queued", 8)
    x = pixels(64, seed=11)  # 2.5 KiB of logits per response: far more than HTTP/2 windows hold
    expected = env.art.digits_reference(x)
    n = 400
    # (without BDP probing, the client's receive window stays at its initial size)
    async with grpc.aio.insecure_channel(gateway.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()

        async def write_all() -> None:
            for i in range(n):
                await call.write(_digits_stream_request(f"b{i}", x))
            await call.done_writing()

        writer = asyncio.create_task(write_all())
        await wait_until(lambda: _stream_queued() >= 8, 30, "the stream's backlog to fill")
        await asyncio.sleep(0.5)  # the workers keep answering; the gateway must not take more of it
        assert _stream_queued() <= 8 + 2, _stream_queued()  # + its own bookkeeping items
        ids = []
        async for response in call:
            assert not response.error_message, response.error_message
            out = response.infer_response
            logits = np.frombuffer(out.raw_output_contents[0], np.float32).reshape(64, 10)
            np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
            ids.append(out.id)
        await asyncio.wait_for(writer, 10)
    assert sorted(ids) == sorted(f"b{i}" for i in range(n))
    await wait_until(lambda: _stream_queued() == 0, 5, "the backlog gauge to drain")


async def test_a_long_lived_stream_forgets_answered_request_ids(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Request ids are sticky to one worker while they have requests in flight; a stream that lives for
    # hours must not keep every id it ever sent.
    import gateway.service as gateway_service

    maps: list[dict[str, object]] = []
    real_init = gateway_service._StreamUpstream.__init__

    def spy(self: object, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        maps.append(self.affinity)  # type: ignore[attr-defined]

    monkeypatch.setattr(gateway_service._StreamUpstream, "__init__", spy)
    x = pixels(1, seed=12)
    async with grpc.aio.insecure_channel(env.stack.gateway.address) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        for i in range(200):
            await call.write(_digits_stream_request(f"a{i}", x))
        for _ in range(200):
            response = await call.read()
            assert not response.error_message, response.error_message
        assert maps and all(len(m) == 0 for m in maps), [len(m) for m in maps]
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF


async def test_canary_split_is_weighted_and_sticky(env: Env) -> None:
    c1, c2 = env.canary
    picker = env.stack.gateway.picker
    picks = [picker.resolve("canary", "", f"user-{i}") for i in range(2000)]
    share = picks.count(c2) / len(picks)
    assert abs(share - 0.10) <= 0.05
    assert abs(sum(request_fraction(f"user-{i}") < 0.9 for i in range(2000)) / 2000 - 0.9) <= 0.05
    # End to end: a sample through the gateway lands exactly where the picker sends each id, every time.
    x = pixels(1)
    ids = [f"user-{i}" for i in range(120)]
    results = await asyncio.gather(
        *(env.client.infer("canary", [digits_input(x)], request_id=i) for i in ids)
    )
    served = [int(r.get_response().model_version) for r in results]
    assert served == [picks[i] for i in range(120)]
    assert set(served) == {c1, c2}
    again = await env.client.infer("canary", [digits_input(x)], request_id=ids[0])
    assert int(again.get_response().model_version) == served[0]


async def test_alias_switch_is_seen_within_a_second(env: Env) -> None:
    c1, c2 = env.canary
    reg = env.stack.registry
    await reg.set_alias("canary", "prod", c1)
    await wait_until(
        lambda: "prod" in dict(env.stack.gateway.picker.model_route("canary").aliases), 5, "alias"
    )
    x = pixels(1)
    first = await env.client.infer("canary", [digits_input(x)], model_version="prod")
    assert int(first.get_response().model_version) == c1
    await reg.set_alias("canary", "prod", c2)
    start = time.monotonic()
    while True:
        r = await env.client.infer("canary", [digits_input(x)], model_version="prod")
        if int(r.get_response().model_version) == c2:
            break
        assert time.monotonic() - start < 1.0, "alias switch not seen within a second"
        await asyncio.sleep(0.01)


async def test_repository_load_and_unload(env: Env) -> None:
    v = await register_digits(env.stack.registry, env.stack.store, env.art, model="spare")
    await env.client.load_model("spare")
    await wait_routable(env.stack.gateway, "spare", v)
    assert await env.client.is_model_ready("spare")
    await env.client.unload_model("spare", unload_dependents=True)


async def test_tiny_deadlines_get_a_right_answer_or_deadline_exceeded(env: Env) -> None:
    """gRPC rounds a deadline this short up (a server sees up to about 1 ms left), so a 1 µs deadline
    can be met by a path faster than that. Whichever way each request goes, it gets the right answer or
    DEADLINE_EXCEEDED, nothing else. (That a deadline shorter than the work reaches the worker and
    leaves its queue is shown deterministically in test_gateway_cancel.py.)"""
    x = pixels(1, seed=3)
    expected = env.art.digits_reference(x)
    for _ in range(20):
        try:
            result = await env.client.infer("digits", [digits_input(x)], client_timeout=0.000001)
        except InferenceServerException as exc:
            assert exc.status() == str(grpc.StatusCode.DEADLINE_EXCEEDED), exc
        else:
            np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    # The gateway is still serving normally afterwards.
    result = await env.client.infer("digits", [digits_input(x)], client_timeout=10)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
