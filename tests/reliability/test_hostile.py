"""Hostile input: thousands of malformed or mutated requests at the gateway's public RPCs and at a worker
directly → no crash, no INTERNAL/UNKNOWN, a clear status with a message, memory flat afterwards."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.errors import status_code
from mesh.server import GRPC_OPTIONS
from mesh.v2 import pb
from tests.reliability.conftest import SharedMesh
from tests.reliability.harness import (
    INFERENCE_SERVICE,
    SERVER_FAULT_CODES,
    STREAM_METHODS,
    UNARY_METHODS,
    WORKER_CONTROL_METHODS,
    raw_stream,
    raw_unary,
    write_figures,
)
from tests.reliability.hostile import digits_request, mutated_requests, prompt_request, random_payloads

RSS_BOUND_KIB = 64 * 1024
WORKER_CONTROL = "maas.v1.WorkerControl"
# Drain is left out on purpose: a well-formed Drain is obeyed (the worker stops taking work); the
# control port is for the mesh's own services (mTLS in production, see test_transport).
CONTROL_METHODS = tuple(m for m in WORKER_CONTROL_METHODS if m != "Drain")
# Stream error_message texts that mean "the server broke" rather than "your request is wrong".
STREAM_FAULT_PREFIXES = ("internal error", "INTERNAL", "UNKNOWN")
TRANSPORT_TEXTS = ("Stream removed", "Internal error from Core", "Received RST_STREAM", "Socket closed")


def is_transport_text(details: str) -> bool:
    """True when an error's text comes from the gRPC transport, not from the service: no clear code then
    (e.g. an error message so long that the trailer overflows the client's 8 KiB metadata limit)."""
    return not details.strip() or details.startswith(TRANSPORT_TEXTS)


class Tally:
    """Counts statuses per target and keeps every bad answer (server-fault code or no message)."""

    def __init__(self) -> None:
        self.codes: Counter[tuple[str, str]] = Counter()
        self.categories: Counter[str] = Counter()
        self.stream_errors: Counter[str] = Counter()
        self.bad: list[str] = []
        # kind of bad answer (target, code, start of the message) -> count
        self.bad_kinds: Counter[str] = Counter()
        # first (category: details) seen per "target code"
        self.examples: dict[str, str] = {}
        # mutations that were answered OK (accepted as valid), per target
        self.ok_mutations: Counter[str] = Counter()
        self.sent = 0

    def record(self, target: str, category: str, code: str, details: str) -> None:
        self.sent += 1
        self.codes[(target, code)] += 1
        if code == "OK" and not category.startswith("random_bytes"):
            for name in category.split(":")[0].split("+"):
                self.ok_mutations[f"{target} {name}"] += 1
        if code != "OK":
            self.examples.setdefault(f"{target} {code}", f"{category}: {details[:160]}")
        for name in category.split(":")[0].split("+"):
            self.categories[name] += 1
        if code in SERVER_FAULT_CODES or (code != "OK" and is_transport_text(details)):
            kind = f"{target} {code} {details[:60]!r}"
            self.bad_kinds[kind] += 1
            self.examples.setdefault(kind, f"{category}: {details[:300]}")
            if len(self.bad) < 50:
                self.bad.append(f"{target} {category}: {code} {details[:200]!r}")

    def record_stream_replies(self, target: str, category: str, replies: list[bytes]) -> None:
        for raw in replies:
            reply = pb.ModelStreamInferResponse.FromString(raw)
            if not reply.error_message:
                continue
            self.stream_errors[target] += 1
            self.examples.setdefault(f"{target} stream error", f"{category}: {reply.error_message[:160]}")
            if reply.error_message.startswith(STREAM_FAULT_PREFIXES):
                self.bad_kinds[f"{target} stream {reply.error_message[:60]!r}"] += 1
                if len(self.bad) < 50:
                    self.bad.append(f"{target} {category}: stream error {reply.error_message[:200]!r}")

    def by_code(self, target: str) -> dict[str, int]:
        return {code: n for (t, code), n in sorted(self.codes.items()) if t == target}


async def _run_bounded(jobs: Iterable[Callable[[], Any]], concurrency: int, deadline: float) -> int:
    """Runs coroutine factories with at most `concurrency` in flight; stops starting new ones at the deadline."""
    sem = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[Any]] = set()
    started = 0
    for job in jobs:
        if time.monotonic() > deadline:
            break
        await sem.acquire()
        task = asyncio.create_task(job())
        task.add_done_callback(lambda _t: sem.release())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        started += 1
    if tasks:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=max(5.0, deadline - time.monotonic() + 30))
    return started


def _storm_jobs(
    channel: grpc.aio.Channel,
    stream_channel: grpc.Channel,
    target: str,
    methods: list[str],
    tally: Tally,
    *,
    random_per_method: int,
    mutated: int,
    streams: int,
    seed: int,
    metadata: tuple[tuple[str, str], ...],
) -> list[Callable[[], Any]]:
    """The hostile calls for one target, as coroutine factories, shuffled."""
    rng = random.Random(seed)
    jobs: list[Callable[[], Any]] = []

    def unary(method: str, payload: bytes, category: str) -> Callable[[], Any]:
        async def call() -> None:
            code, details = await raw_unary(channel, method, payload, metadata, timeout_s=30.0)
            tally.record(target, category, code, details)

        return call

    def stream(payloads: list[bytes], category: str) -> Callable[[], Any]:
        async def call() -> None:
            method = f"/{INFERENCE_SERVICE}/ModelStreamInfer"
            code, details, replies = await asyncio.to_thread(
                raw_stream, stream_channel, method, payloads, metadata, 30.0
            )
            tally.record(target, category, code, details)
            tally.record_stream_replies(target, category, replies)
            tally.sent += max(0, len(payloads) - 1)  # every request on the stream counts

        return call

    for method in methods:
        for payload in random_payloads(rng, random_per_method):
            if method.endswith("/ModelStreamInfer"):
                jobs.append(stream([payload, payload[::-1]], f"random_bytes:{method}"))
            else:
                jobs.append(unary(method, payload, f"random_bytes:{method}"))
    builders = [digits_request, lambda r: prompt_request("chatty", r)]
    infer = f"/{INFERENCE_SERVICE}/ModelInfer"
    for category, req in mutated_requests(builders, mutated, seed + 1):
        jobs.append(unary(infer, req.SerializeToString(), category))
    stream_reqs = list(mutated_requests(builders, streams * 3, seed + 2))
    for i in range(streams):
        chunk = stream_reqs[i * 3 : i * 3 + 3]
        jobs.append(
            stream([r.SerializeToString() for _, r in chunk], "stream:" + ",".join(c for c, _ in chunk))
        )
    rng.shuffle(jobs)
    return jobs


async def _valid_roundtrip(mesh: SharedMesh) -> None:
    """A correct request still gets the correct answer, through the gateway and from the worker."""
    import tritonclient.grpc.aio as grpcclient

    for url, headers in ((mesh.gateway_url, mesh.bearer(mesh.admin_key[1])), (mesh.worker_url, None)):
        client = grpcclient.InferenceServerClient(url)
        try:
            inp = grpcclient.InferInput("pixels", list(mesh.pixels.shape), "FP32")
            inp.set_data_from_numpy(mesh.pixels)
            result = await client.infer("digits", [inp], headers=headers, client_timeout=10.0)
            np.testing.assert_allclose(result.as_numpy("logits"), mesh.expected, rtol=1e-4, atol=1e-4)
        finally:
            await client.close()


@pytest.mark.slow
async def test_hostile_storm_gateway_and_worker(shared_mesh: SharedMesh, figures_path: Path) -> None:
    mesh = shared_mesh
    gateway, worker = mesh.stack.gateway, mesh.stack.workers[0]
    assert gateway is not None
    admin = (("authorization", f"Bearer {mesh.admin_key[1]}"),)
    v2_methods = [f"/{INFERENCE_SERVICE}/{m}" for m in (*UNARY_METHODS, *STREAM_METHODS)]
    ctl_methods = [f"/{WORKER_CONTROL}/{m}" for m in CONTROL_METHODS]
    gw_channel = grpc.aio.insecure_channel(mesh.gateway_url, options=GRPC_OPTIONS)
    wk_channel = grpc.aio.insecure_channel(mesh.worker_url, options=GRPC_OPTIONS)
    gw_sync = grpc.insecure_channel(mesh.gateway_url, options=GRPC_OPTIONS)
    wk_sync = grpc.insecure_channel(mesh.worker_url, options=GRPC_OPTIONS)
    try:
        # Warm-up: every kind of call once in small numbers, so the RSS baseline includes the caches
        # and pools a storm legitimately fills.
        warm = Tally()
        jobs = _storm_jobs(
            gw_channel,
            gw_sync,
            "gateway",
            v2_methods,
            warm,
            random_per_method=5,
            mutated=300,
            streams=10,
            seed=100,
            metadata=admin,
        ) + _storm_jobs(
            wk_channel,
            wk_sync,
            "worker",
            v2_methods + ctl_methods,
            warm,
            random_per_method=5,
            mutated=300,
            streams=10,
            seed=200,
            metadata=(),
        )
        await _run_bounded(jobs, 16, time.monotonic() + 60)
        await _valid_roundtrip(mesh)
        await asyncio.sleep(0.5)
        rss_before = {"gateway": gateway.rss_kib(), "worker": worker.rss_kib()}

        tally = Tally()
        t0 = time.monotonic()
        jobs = _storm_jobs(
            gw_channel,
            gw_sync,
            "gateway",
            v2_methods,
            tally,
            random_per_method=80,
            mutated=2600,
            streams=120,
            seed=1,
            metadata=admin,
        ) + _storm_jobs(
            wk_channel,
            wk_sync,
            "worker",
            v2_methods + ctl_methods,
            tally,
            random_per_method=50,
            mutated=1600,
            streams=80,
            seed=2,
            metadata=(),
        )
        random.Random(3).shuffle(jobs)
        await _run_bounded(jobs, 16, time.monotonic() + 150)
        storm_s = time.monotonic() - t0
        await asyncio.sleep(0.5)
        rss_after = {"gateway": gateway.rss_kib(), "worker": worker.rss_kib()}
        alive = {"gateway": gateway.alive, "worker": worker.alive}
        if all(alive.values()):
            await _valid_roundtrip(mesh)
    finally:
        await gw_channel.close()
        await wk_channel.close()
        gw_sync.close()
        wk_sync.close()

    figures = {
        "requests_sent": tally.sent,
        "gateway_codes": tally.by_code("gateway"),
        "worker_codes": tally.by_code("worker"),
        "stream_per_request_errors": dict(tally.stream_errors),
        "categories": dict(tally.categories.most_common()),
        "server_fault_answers": sum(tally.bad_kinds.values()),
        "server_fault_kinds": dict(tally.bad_kinds.most_common()),
        "example_per_code": tally.examples,
        "accepted_mutations": dict(tally.ok_mutations.most_common()),
        "storm_seconds": round(storm_s, 1),
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "rss_growth_kib": {k: rss_after[k] - rss_before[k] for k in rss_before},
        "processes_alive": alive,
    }
    write_figures(figures_path, "hostile_storm", figures)
    assert all(alive.values()), f"a process died: {alive}"
    assert tally.sent >= 5000
    assert not tally.bad_kinds, "server-fault statuses or unexplained errors:\n" + "\n".join(
        [*(f"{n} x {kind}" for kind, n in tally.bad_kinds.most_common()), "examples:", *tally.bad[:15]]
    )
    for name in rss_before:
        assert rss_after[name] - rss_before[name] < RSS_BOUND_KIB, (
            f"{name} RSS grew: {figures['rss_growth_kib']}"
        )


# ------------------------------------------------------------------------------------------ hypothesis

_dims = st.one_of(st.sampled_from([1, 2, 64, 1, 64]), st.integers(-3, 130), st.integers(-(2**63), 2**63 - 1))
_names = st.one_of(
    st.sampled_from(["pixels", "prompt", "max_tokens", "pixels", "prompt", ""]), st.text(max_size=12)
)
_params = st.dictionaries(
    st.one_of(
        st.sampled_from(["priority", "timeout", "triton_enable_empty_final_response", "triton_x"]),
        st.text(max_size=8),
    ),
    st.one_of(
        st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
        st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
        st.builds(lambda v: pb.InferParameter(string_param=v), st.text(max_size=8)),
        st.builds(lambda v: pb.InferParameter(double_param=v), st.floats(allow_nan=True)),
        st.builds(lambda v: pb.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    ),
    max_size=3,
)


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(
        # Mostly real models and versions, so most requests get past the name checks.
        model_name=draw(st.sampled_from(["digits", "digits", "digits", "chatty", "chatty", "nope"]))
        if draw(st.integers(0, 9))
        else draw(st.text(max_size=10)),
        model_version=draw(st.sampled_from(["", "", "", "1", "stable", "-1"]))
        if draw(st.integers(0, 9))
        else draw(st.text(max_size=6)),
        id=draw(st.text(max_size=8)),
    )
    for key, value in draw(_params).items():
        req.parameters[key].CopyFrom(value)
    for _ in range(draw(st.integers(0, 3))):
        t = req.inputs.add(
            name=draw(_names),
            datatype=draw(
                st.sampled_from(["FP32", "BYTES", "INT32", "INT64", "FP16", "BOOL", "UINT8", "X", ""])
            ),
            shape=draw(st.lists(_dims, max_size=4)),
        )
        for key, value in draw(_params).items():
            t.parameters[key].CopyFrom(value)
        if draw(st.booleans()):
            t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=140)))
        if draw(st.booleans()):
            t.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=3)))
    for _ in range(draw(st.integers(0, 3))):
        req.raw_input_contents.append(draw(st.binary(max_size=1100)))
    for name in draw(st.lists(_names, max_size=2)):
        req.outputs.add(name=name)
    return req


def test_hostile_hypothesis_requests(shared_mesh: SharedMesh, figures_path: Path) -> None:
    """Hypothesis-generated ModelInferRequests (ModelInfer and ModelStreamInfer) at gateway and worker."""
    mesh = shared_mesh
    admin = (("authorization", f"Bearer {mesh.admin_key[1]}"),)
    channels = {
        "gateway": (grpc.insecure_channel(mesh.gateway_url, options=GRPC_OPTIONS), admin),
        "worker": (grpc.insecure_channel(mesh.worker_url, options=GRPC_OPTIONS), ()),
    }
    codes: Counter[str] = Counter()
    bad: list[str] = []

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(req=infer_requests())
    def check(req: pb.ModelInferRequest) -> None:
        payload = req.SerializeToString()
        for target, (channel, metadata) in channels.items():
            infer = channel.unary_unary(f"/{INFERENCE_SERVICE}/ModelInfer")
            try:
                infer(payload, metadata=metadata or None, timeout=30.0)
                code, details = "OK", ""
            except grpc.RpcError as exc:
                code, details = exc.code().name, exc.details() or ""  # type: ignore[attr-defined]
            codes[f"{target}:{code}"] += 1
            if code in SERVER_FAULT_CODES or (code != "OK" and not details):
                bad.append(f"{target} ModelInfer {code} {details[:200]!r} for {req!r}"[:600])
            stream = channel.stream_stream(f"/{INFERENCE_SERVICE}/ModelStreamInfer")
            try:
                replies = list(stream(iter([payload]), metadata=metadata or None, timeout=30.0))
                code = "OK"
            except grpc.RpcError as exc:
                replies, code = [], exc.code().name  # type: ignore[attr-defined]
            codes[f"{target}:stream:{code}"] += 1
            if code in SERVER_FAULT_CODES:
                bad.append(f"{target} ModelStreamInfer {code} for {req!r}"[:600])
            for raw in replies:
                msg = pb.ModelStreamInferResponse.FromString(raw).error_message
                if msg.startswith(STREAM_FAULT_PREFIXES):
                    bad.append(f"{target} stream error {msg[:200]!r} for {req!r}"[:600])

    try:
        check()
    finally:
        for channel, _ in channels.values():
            channel.close()
    write_figures(
        figures_path, "hostile_hypothesis", {"answers": dict(sorted(codes.items())), "bad": len(bad)}
    )
    assert mesh.stack.gateway is not None and mesh.stack.gateway.alive and mesh.stack.workers[0].alive
    assert not bad, "\n".join(bad[:20])


@pytest.mark.slow
async def test_hostile_frames_on_the_worker_data_path(shared_mesh: SharedMesh, figures_path: Path) -> None:
    """The gateway's multiplexed path (maas.v1.WorkerInference) on a worker's port: random bytes and
    mutated requests as frames, cancels of unknown tags, absurd timeouts. Every frame gets exactly one
    answer with a client-error code, the stream stays open until the client half-closes, the worker
    keeps serving."""
    from mesh_pb import worker_pb2, worker_pb2_grpc

    mesh = shared_mesh
    worker = mesh.stack.workers[0]
    rng = random.Random(7)
    frames: list[worker_pb2.InferFrame] = []
    builders = [digits_request, lambda r: prompt_request("chatty", r)]
    payloads = [req.SerializeToString() for _, req in mutated_requests(builders, 400, 11)]
    payloads += random_payloads(rng, 200)
    for tag, payload in enumerate(payloads, start=1):
        frames.append(
            worker_pb2.InferFrame(
                tag=tag, request=payload, timeout_us=rng.choice([0, 1, 2**63 - 1, 5_000_000])
            )
        )
        if rng.random() < 0.1:  # a cancel for a tag nobody sent
            frames.append(worker_pb2.InferFrame(tag=10**9 + tag, cancel=True))
    channel = grpc.aio.insecure_channel(mesh.worker_url, options=GRPC_OPTIONS)
    codes: Counter[str] = Counter()
    seen: Counter[int] = Counter()
    try:
        call = worker_pb2_grpc.WorkerInferenceStub(channel).Infer(timeout=120)

        async def write() -> None:
            for frame in frames:
                await call.write(frame)
            await call.done_writing()

        writer = asyncio.create_task(write())
        async for result in call:
            seen[result.tag] += 1
            codes[status_code(result.code).name] += 1
        await writer
        status = await call.code()
        await _valid_roundtrip(mesh)
    finally:
        await channel.close()
    write_figures(
        figures_path,
        "hostile_worker_frames",
        {
            "frames": len(payloads),
            "codes": dict(codes),
            "stream_status": status.name,
            "worker_alive": worker.alive,
        },
    )
    assert worker.alive
    assert status == grpc.StatusCode.OK
    assert set(seen) == set(range(1, len(payloads) + 1)) and max(seen.values()) == 1  # one answer each
    assert not {"INTERNAL", "UNKNOWN"} & set(codes), codes
