"""Dynamic batching on vs off: one encoder artifact loaded twice on a standalone worker, one config each."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mesh_pb import common_pb2, worker_pb2, worker_pb2_grpc

BATCHING_ON = 1
BATCHING_OFF = 2


def build_encoder_versions(
    store_dir: Path, size: str = "small", max_queue_delay_us: int = 1000
) -> tuple[common_pb2.ModelVersion, common_pb2.ModelVersion]:
    """Exports the demo encoder (random weights) into store_dir; returns version records 1 (on) and 2 (off)."""
    import tempfile

    import torch

    from mesh.store import ArtifactStore
    from workers.models.encoder import build_encoder, encoder_config, example_input_ids
    from workers.models.export import export_module

    cfg = encoder_config(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_encoder(cfg).eval()
    with tempfile.TemporaryDirectory(prefix="maas-bench-encoder-") as tmp:
        path = export_module(
            model, example_input_ids(2, cfg["max_len"], cfg["vocab_size"]), Path(tmp) / "model.pt2"
        )
        artifact = ArtifactStore(store_dir).put_file("encoder", "bench", path, "model.pt2")
    max_batch = 64
    signature = common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="input_ids", datatype="INT64", shape=[-1, cfg["max_len"]])],
        outputs=[common_pb2.TensorSpec(name="embedding", datatype="FP32", shape=[-1, int(cfg["hidden"])])],
        max_batch_size=max_batch,
    )

    def version(number: int, enabled: bool) -> common_pb2.ModelVersion:
        return common_pb2.ModelVersion(
            ref=common_pb2.ModelRef(name="encoder", version=number),
            state=common_pb2.READY,
            artifact_uri=artifact.uri,
            sha256=artifact.sha256,
            size_bytes=artifact.size_bytes,
            format="torch_export",
            signature=signature,
            batching=common_pb2.BatchingConfig(
                enabled=enabled, max_queue_delay_us=max_queue_delay_us if enabled else 0
            ),
            dtype="fp32",
            labels={"size": size, "bench": "batching-on" if enabled else "batching-off"},
        )

    return version(BATCHING_ON, True), version(BATCHING_OFF, False)


async def load_versions(
    address: str, versions: list[common_pb2.ModelVersion], timeout_s: float = 300.0
) -> None:
    """LoadVersion on the worker's control service for each record (verifies sha256, warms up)."""
    from mesh.server import open_channel

    async with open_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerControlStub(channel)
        for mv in versions:
            await stub.LoadVersion(worker_pb2.LoadVersionRequest(version=mv), timeout=timeout_s)


def load_versions_sync(address: str, versions: list[common_pb2.ModelVersion]) -> None:
    asyncio.run(load_versions(address, versions))


def inprocess_ceiling(
    store_dir: Path,
    record: common_pb2.ModelVersion,
    batches: tuple[int, int] = (1, 32),
    min_s: float = 5.0,
    rounds: int = 5,
) -> tuple[float, float]:
    """Milliseconds per sequence of the record's model run in-process (no gRPC) at each of two batch sizes.

    Uses the worker's own runtime loader on the CPU with one torch thread (as the worker runs on a small
    box), the batches interleaved; each figure is the best of `rounds` rounds of at least
    `min_s` / (2 × rounds) seconds (other work on a shared machine only ever makes a round slower).
    """
    import time

    import numpy as np
    import torch

    from mesh.store import ArtifactStore
    from workers.runtimes import load_runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = ArtifactStore(store_dir).verify(record.artifact_uri, record.sha256)
        runtime = load_runtime(record, path, torch.device("cpu"), warmup=True)
        name = record.signature.inputs[0].name
        row = int(record.signature.inputs[0].shape[1])
        rng = np.random.default_rng(0)
        data = {b: {name: rng.integers(0, 30522, (b, row)).astype(np.int64)} for b in batches}
        best = {b: float("inf") for b in batches}
        for _ in range(rounds):
            for b in batches:
                runtime.forward(data[b])
                calls, start = 0, time.perf_counter()
                while True:
                    runtime.forward(data[b])
                    calls += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= min_s / (2 * rounds):
                        break
                best[b] = min(best[b], elapsed * 1000.0 / (calls * b))
        runtime.close()
    finally:
        torch.set_num_threads(threads)
    return best[batches[0]], best[batches[1]]
