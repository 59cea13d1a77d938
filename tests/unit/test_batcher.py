"""Dynamic batcher: merging, splitting, deadlines, cancellation, backpressure, failure isolation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mesh.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted
from workers.batcher import BatchingPolicy, DynamicBatcher

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 7.0


def affine(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = inputs["x"]
    if np.any(x < -1000):
        raise ValueError("poison row")
    return {"y": x @ W + 1.0}


class Gate:
    """Run function that blocks until released, to hold requests in the queue."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.sizes.append(int(inputs["x"].shape[0]))
        self.entered.set()
        assert self.release.wait(10)
        return affine(inputs)


@pytest.fixture
def executor():
    ex = ThreadPoolExecutor(2)
    yield ex
    ex.shutdown(wait=True)


async def test_concurrent_requests_merge_and_split(executor: ThreadPoolExecutor) -> None:
    gate = Gate()
    b = DynamicBatcher(gate, BatchingPolicy(max_batch_size=16, max_queue_delay_us=2000), executor, name="m")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(12)]
    first = asyncio.create_task(b.submit({"x": xs[0]}))
    await asyncio.to_thread(gate.entered.wait, 5)
    rest = [asyncio.create_task(b.submit({"x": x})) for x in xs[1:]]
    await asyncio.sleep(0.05)
    assert b.queue_depth == len(xs) - 1
    gate.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_allclose(r["y"], x @ W + 1.0, rtol=1e-5, atol=1e-6)
    assert max(gate.sizes) > xs[0].shape[0]
    assert b.stats.execution_count < len(xs)
    assert any(size > 1 for size in b.stats.batches)
    assert b.stats.inference_count == sum(x.shape[0] for x in xs)
    st = b.stats
    assert st.compute_input.count == st.compute_infer.count == st.compute_output.count == len(xs)
    assert st.success.count == len(xs)
    await b.close()


async def test_max_batch_size_respected_and_preferred(executor: ThreadPoolExecutor) -> None:
    gate = Gate()
    b = DynamicBatcher(
        gate,
        BatchingPolicy(max_batch_size=8, max_queue_delay_us=100_000, preferred_batch_sizes=(4,)),
        executor,
        name="m",
    )
    gate.release.set()
    xs = [np.full((1, 4), i, np.float32) for i in range(10)]
    results = await asyncio.wait_for(asyncio.gather(*(b.submit({"x": x}) for x in xs)), 10)
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_allclose(r["y"], x @ W + 1.0, rtol=1e-5, atol=1e-6)
    assert max(gate.sizes) <= 8
    assert 4 in gate.sizes
    await b.close()


async def test_batch_over_max_rejected(executor: ThreadPoolExecutor) -> None:
    b = DynamicBatcher(affine, BatchingPolicy(max_batch_size=4), executor, name="m")
    with pytest.raises(InvalidArgument, match="max_batch_size"):
        await b.submit({"x": np.zeros((5, 4), np.float32)})
    await b.close()


async def test_incompatible_shapes_not_merged(executor: ThreadPoolExecutor) -> None:
    seen: list[tuple[int, ...]] = []

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(inputs["x"].shape)
        return {"y": inputs["x"].sum(axis=1)}

    b = DynamicBatcher(run, BatchingPolicy(max_batch_size=8, max_queue_delay_us=20_000), executor, name="m")
    a, c = np.ones((2, 3), np.float32), np.ones((1, 5), np.float32)
    ra, rc = await asyncio.wait_for(asyncio.gather(b.submit({"x": a}), b.submit({"x": c})), 10)
    np.testing.assert_allclose(ra["y"], [3, 3])
    np.testing.assert_allclose(rc["y"], [5])
    assert sorted(seen) == [(1, 5), (2, 3)]
    await b.close()


async def test_deadline_expires_in_queue(executor: ThreadPoolExecutor) -> None:
    gate = Gate()
    b = DynamicBatcher(gate, BatchingPolicy(max_batch_size=4), executor, name="m")
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(b.submit({"x": np.ones((1, 4), np.float32)}))
    await asyncio.to_thread(gate.entered.wait, 5)
    with pytest.raises(DeadlineExceeded, match="deadline"):
        await b.submit({"x": np.ones((1, 4), np.float32)}, deadline=loop.time() + 0.05)
    assert b.queue_depth == 0
    gate.release.set()
    await asyncio.wait_for(first, 10)
    assert b.stats.fail.count == 1
    await b.close()


async def test_cancelled_request_frees_slot_and_full_queue(executor: ThreadPoolExecutor) -> None:
    gate = Gate()
    b = DynamicBatcher(gate, BatchingPolicy(max_batch_size=4, max_queue_size=2), executor, name="m")
    first = asyncio.create_task(b.submit({"x": np.ones((1, 4), np.float32)}))
    await asyncio.to_thread(gate.entered.wait, 5)
    q1 = asyncio.create_task(b.submit({"x": np.ones((1, 4), np.float32)}))
    q2 = asyncio.create_task(b.submit({"x": np.ones((1, 4), np.float32)}))
    await asyncio.sleep(0.02)
    assert b.queue_depth == 2
    with pytest.raises(ResourceExhausted, match="full"):
        await b.submit({"x": np.ones((1, 4), np.float32)})
    q1.cancel()
    await asyncio.sleep(0.01)
    assert b.queue_depth == 1
    q3 = asyncio.create_task(b.submit({"x": 2 * np.ones((1, 4), np.float32)}))
    gate.release.set()
    r = await asyncio.wait_for(asyncio.gather(first, q2, q3), 10)
    np.testing.assert_allclose(r[2]["y"], 2 * np.ones((1, 4), np.float32) @ W + 1.0, rtol=1e-5, atol=1e-6)
    assert await b.drain(5)
    await b.close()


async def test_failing_request_fails_alone(executor: ThreadPoolExecutor) -> None:
    gate = Gate()
    b = DynamicBatcher(gate, BatchingPolicy(max_batch_size=8, max_queue_delay_us=1000), executor, name="m")
    first = asyncio.create_task(b.submit({"x": np.ones((1, 4), np.float32)}))
    await asyncio.to_thread(gate.entered.wait, 5)
    good = [asyncio.create_task(b.submit({"x": np.full((1, 4), i, np.float32)})) for i in range(3)]
    bad = asyncio.create_task(b.submit({"x": np.full((1, 4), -5000, np.float32)}))
    await asyncio.sleep(0.02)
    gate.release.set()
    await asyncio.wait_for(first, 10)
    for i, t in enumerate(good):
        r = await asyncio.wait_for(t, 10)
        np.testing.assert_allclose(r["y"], np.full((1, 4), i, np.float32) @ W + 1.0, rtol=1e-5, atol=1e-6)
    with pytest.raises(Internal, match="poison"):
        await asyncio.wait_for(bad, 10)
    await b.close()


async def test_batching_disabled_runs_alone(executor: ThreadPoolExecutor) -> None:
    gate = Gate()
    gate.release.set()
    b = DynamicBatcher(gate, BatchingPolicy(max_batch_size=8, enabled=False), executor, name="m")
    xs = [np.full((2, 4), i, np.float32) for i in range(5)]
    results = await asyncio.wait_for(asyncio.gather(*(b.submit({"x": x}) for x in xs)), 10)
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_allclose(r["y"], x @ W + 1.0, rtol=1e-5, atol=1e-6)
    assert gate.sizes == [2] * 5
    await b.close()


async def test_cheap_version_runs_inline_when_idle(executor: ThreadPoolExecutor) -> None:
    """A version whose forward pass is cheap runs on the event loop once measured (no thread hand-off)."""
    threads: list[int] = []

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        threads.append(threading.get_ident())
        return affine(inputs)

    b = DynamicBatcher(run, BatchingPolicy(max_batch_size=8, max_queue_delay_us=0), executor, name="m")
    xs = [np.full((1, 4), i, np.float32) for i in range(12)]
    for x in xs:
        r = await asyncio.wait_for(b.submit({"x": x}), 10)
        np.testing.assert_allclose(r["y"], x @ W + 1.0, rtol=1e-5, atol=1e-6)
    loop_thread = threading.get_ident()
    assert threads[0] != loop_thread  # measured on a compute thread first
    assert threads[-1] == loop_thread  # then inline
    st = b.stats
    assert st.success.count == st.compute_infer.count == st.execution_count == len(xs)
    assert b.in_flight == 0 and b.queue_depth == 0
    # A failing request still fails alone, with Internal, on the inline path too.
    with pytest.raises(Internal, match="poison"):
        await b.submit({"x": np.full((1, 4), -5000, np.float32)})
    assert st.fail.count == 1 and b.in_flight == 0
    # inline_compute_us=0 keeps every forward pass on a compute thread.
    threads.clear()
    off = DynamicBatcher(run, BatchingPolicy(max_batch_size=8, inline_compute_us=0), executor, name="m")
    for x in xs:
        await off.submit({"x": x})
    assert loop_thread not in threads
    await b.close()
    await off.close()


class Recorder(Gate):
    """A Gate that also records which requests (their first column's values) each forward pass ran."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[float]] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches.append([float(v) for v in inputs["x"][:, 0]])
        return super().__call__(inputs)


def row(tag: float) -> np.ndarray:
    return np.full((1, 4), tag, np.float32)


async def _hold(b: DynamicBatcher, gate: Gate) -> asyncio.Task[dict[str, np.ndarray]]:
    """Submits one request and waits until its forward pass holds the compute slot."""
    first = asyncio.create_task(b.submit({"x": row(-1)}))
    await asyncio.to_thread(gate.entered.wait, 5)
    return first


async def _queue(b: DynamicBatcher, requests: list[tuple[float, int | None]]) -> list[asyncio.Task]:
    """Queues (tag, priority) requests in this order (None = no priority argument)."""
    tasks = []
    for tag, priority in requests:
        coro = b.submit({"x": row(tag)}) if priority is None else b.submit({"x": row(tag)}, priority=priority)
        tasks.append(asyncio.create_task(coro))
        await asyncio.sleep(0)  # let it reach the queue: arrival order is submit order
    await asyncio.sleep(0.02)
    assert b.queue_depth == len(requests)
    return tasks


async def _check_results(tasks: list[asyncio.Task], tags: list[float]) -> None:
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    for tag, r in zip(tags, results, strict=True):
        np.testing.assert_allclose(r["y"], row(tag) @ W + 1.0, rtol=1e-5, atol=1e-6)


async def test_higher_priority_runs_first_fifo_within_level(executor: ThreadPoolExecutor) -> None:
    gate = Recorder()
    b = DynamicBatcher(gate, BatchingPolicy(max_batch_size=8, enabled=False), executor, name="m")
    first = await _hold(b, gate)
    # tag = arrival number; priorities: 5 = low, 1 = high, 0 / none = default (after every level).
    requests: list[tuple[float, int | None]] = [
        (1, 5),
        (2, 5),
        (3, None),
        (4, 1),
        (5, 0),
        (6, 1),
        (7, 5),
        (8, 2),
    ]
    tasks = await _queue(b, requests)
    gate.release.set()
    await asyncio.wait_for(first, 10)
    await _check_results(tasks, [tag for tag, _ in requests])
    assert [batch[0] for batch in gate.batches] == [-1, 4, 6, 8, 1, 2, 7, 3, 5]
    assert await b.drain(5)
    await b.close()


async def test_priority_batches_fill_from_the_highest_level(executor: ThreadPoolExecutor) -> None:
    gate = Recorder()
    b = DynamicBatcher(gate, BatchingPolicy(max_batch_size=2), executor, name="m")
    first = await _hold(b, gate)
    requests: list[tuple[float, int | None]] = [(1, 3), (2, 3), (3, 3), (4, 1), (5, 1), (6, 1)]
    tasks = await _queue(b, requests)
    gate.release.set()
    await asyncio.wait_for(first, 10)
    await _check_results(tasks, [tag for tag, _ in requests])
    assert gate.batches == [[-1], [4, 5], [6, 1], [2, 3]]
    assert b.stats.inference_count == 7 and b.stats.success.count == 7
    await b.close()


async def test_priority_zero_is_the_default_level(executor: ThreadPoolExecutor) -> None:
    """With levels 1..3 and default 2: 0, no priority and out-of-range priorities all queue at level 2."""
    gate = Recorder()
    policy = BatchingPolicy(max_batch_size=8, enabled=False, priority_levels=3, default_priority_level=2)
    b = DynamicBatcher(gate, policy, executor, name="m")
    first = await _hold(b, gate)
    requests: list[tuple[float, int | None]] = [(1, 3), (2, 0), (3, 9), (4, None), (5, 1), (6, 2)]
    tasks = await _queue(b, requests)
    gate.release.set()
    await asyncio.wait_for(first, 10)
    await _check_results(tasks, [tag for tag, _ in requests])
    assert [batch[0] for batch in gate.batches] == [-1, 5, 2, 3, 4, 6, 1]
    await b.close()


async def test_priority_with_deadline_cancel_and_preferred_cut(executor: ThreadPoolExecutor) -> None:
    gate = Recorder()
    policy = BatchingPolicy(max_batch_size=4, preferred_batch_sizes=(2,))
    b = DynamicBatcher(gate, policy, executor, name="m")
    loop = asyncio.get_running_loop()
    first = await _hold(b, gate)
    requests: list[tuple[float, int | None]] = [(1, 4), (2, 4), (3, 1), (4, 1), (5, 2)]
    tasks = await _queue(b, requests)
    # A high-priority request whose deadline passes in the queue leaves it; a cancelled one too.
    expiring = asyncio.create_task(b.submit({"x": row(9)}, loop.time() + 0.05, priority=1))
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(expiring, 5)
    tasks[3].cancel()
    await asyncio.sleep(0.01)
    assert b.queue_depth == 4
    gate.release.set()
    await asyncio.wait_for(first, 10)
    kept = [t for i, t in enumerate(tasks) if i != 3]
    await _check_results(kept, [1, 2, 3, 5])
    # Batches of the preferred size 2, highest levels first; the cut-back request keeps its place.
    assert gate.batches == [[-1], [3, 5], [1, 2]]
    with pytest.raises(asyncio.CancelledError):
        await tasks[3]
    assert await b.drain(5)
    await b.close()


async def test_incompatible_high_priority_request_keeps_its_place(executor: ThreadPoolExecutor) -> None:
    """A batch starts at the first queued request; a skipped incompatible one is next, not last."""
    seen: list[tuple[int, ...]] = []
    gate = Gate()

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(inputs["x"].shape)
        if inputs["x"].shape[1] == 4:
            return gate(inputs)
        return {"y": inputs["x"].sum(axis=1)}

    policy = BatchingPolicy(max_batch_size=4, preferred_batch_sizes=(2,))
    b = DynamicBatcher(run, policy, executor, name="m")
    first = await _hold(b, gate)
    wide = np.ones((1, 5), np.float32)
    t1 = asyncio.create_task(b.submit({"x": row(1)}, priority=1))
    await asyncio.sleep(0)
    t2 = asyncio.create_task(b.submit({"x": wide}, priority=1))
    await asyncio.sleep(0)
    t3 = asyncio.create_task(b.submit({"x": row(3)}, priority=2))
    await asyncio.sleep(0)
    t4 = asyncio.create_task(b.submit({"x": row(4)}, priority=3))
    await asyncio.sleep(0.02)
    gate.release.set()
    await asyncio.wait_for(first, 10)
    r1, r2, r3, r4 = await asyncio.wait_for(asyncio.gather(t1, t2, t3, t4), 10)
    np.testing.assert_allclose(r2["y"], [5])
    for tag, r in ((1, r1), (3, r3), (4, r4)):
        np.testing.assert_allclose(r["y"], row(tag) @ W + 1.0, rtol=1e-5, atol=1e-6)
    # [1, 3] is the preferred 2 (4 is cut back), then the wide request, then 4.
    assert seen == [(1, 4), (2, 4), (1, 5), (1, 4)]
    await b.close()


async def test_priority_bad_values(executor: ThreadPoolExecutor) -> None:
    with pytest.raises(ValueError, match="priority"):
        DynamicBatcher(affine, BatchingPolicy(priority_levels=2, default_priority_level=3), executor)
    gate = Gate()
    b = DynamicBatcher(gate, BatchingPolicy(max_batch_size=4), executor, name="m")
    first = await _hold(b, gate)
    with pytest.raises(InvalidArgument, match="priority"):
        await b.submit({"x": row(1)}, priority=-1)
    assert b.queue_depth == 0
    gate.release.set()
    await asyncio.wait_for(first, 10)
    await b.close()


async def test_idle_request_with_priority_runs_at_once(executor: ThreadPoolExecutor) -> None:
    """Priority changes nothing for a request that finds the batcher idle (inline fast path included)."""
    b = DynamicBatcher(affine, BatchingPolicy(max_batch_size=8), executor, name="m")
    for i in range(12):
        r = await asyncio.wait_for(b.submit({"x": row(i)}, priority=i % 3), 10)
        np.testing.assert_allclose(r["y"], row(i) @ W + 1.0, rtol=1e-5, atol=1e-6)
    assert b.queue_depth == 0 and b.stats.success.count == 12
    await b.close()
