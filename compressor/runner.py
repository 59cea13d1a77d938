"""One job from parent to registered result: load, run the methods, evaluate, gate, export (transport-free)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compressor import evaluate
from compressor.artifacts import example_input, load_dataset, load_parent, save_result
from compressor.methods import CompressionContext, StepSpec, run_pipeline
from compressor.methods.base import Dataset
from mesh.errors import FailedPrecondition, InvalidArgument
from mesh.store import ArtifactStore
from mesh_pb import common_pb2, compressor_pb2
from workers.models.export import load_program

logger = logging.getLogger(__name__)

# Labels of the parent that describe the parent only.
_PARENT_ONLY_LABELS = ("demo_build", "accuracy", "arch", "arch_config", "quantize", "compute_dtype")


class ProgressBox:
    """Latest (fraction, stage) written by the job thread, read by the event loop (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fraction = 0.0
        self.stage = ""
        self.version = 0

    def set(self, fraction: float, stage: str) -> None:
        with self._lock:
            self.fraction = max(self.fraction, min(1.0, fraction))
            self.stage = stage
            self.version += 1

    def read(self) -> tuple[int, float, str]:
        with self._lock:
            return self.version, self.fraction, self.stage


@dataclass
class Outcome:
    """What a finished pipeline produced, before registration."""

    path: Path
    format: str
    report: compressor_pb2.EvalReport
    passed: bool
    reason: str
    methods: list[str]
    metrics: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)
    dtype: str = "fp32"


def resolve_device(requested: str, default: str = "auto") -> torch.device:
    """ "" / "auto" → CUDA when present else CPU; "cpu"; "cuda" / "cuda:N" (refused without a GPU)."""
    name = (requested or default or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidArgument(f"device: {requested!r} asked for CUDA, this compressor has no GPU")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise InvalidArgument(f"device: {requested!r} is not a device name") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgument(f"device: {requested!r} does not exist ({torch.cuda.device_count()} GPUs)")
        return dev
    raise InvalidArgument(f"device: {requested!r} must be auto, cpu or cuda")


def _file_size(path: Path | None, fallback: int) -> int:
    return int(path.stat().st_size) if path is not None and path.exists() else int(fallback)


def execute(
    store: ArtifactStore,
    parent: common_pb2.ModelVersion,
    steps: list[StepSpec],
    *,
    device: torch.device,
    max_accuracy_drop: float,
    out_dir: Path,
    progress: Callable[[float, str], None],
    should_stop: Callable[[], bool],
    latency_batch: int = 64,
    latency_iters: int = 100,
    seed: int = 0,
) -> Outcome:
    """Runs the whole job synchronously (call it from a worker thread)."""
    progress(0.01, "loading parent")
    loaded = load_parent(store, parent)
    eval_data = load_dataset(store, parent, "eval_data")
    if eval_data is None:
        raise InvalidArgument(
            f"source.version: {parent.ref.name}:{parent.ref.version} has no eval_data_uri label"
        )
    train_data = load_dataset(store, parent, "train_data")

    parent_module = loaded.module
    parent_module.eval()
    progress(0.03, "measuring parent")
    parent_dev = parent_module.to(device) if device.type != "cpu" else parent_module
    parent_m = evaluate.measure(parent_dev, eval_data, batch=latency_batch, iters=latency_iters)
    parent_m.size_bytes = _file_size(loaded.path, parent.size_bytes)
    parent_module.cpu()

    # A fresh copy for the pipeline, so the parent's figures stay those of the parent.
    import copy

    work = copy.deepcopy(parent_module)
    ctx = CompressionContext(
        module=work,
        arch=loaded.arch,
        config=dict(loaded.config),
        train=train_data,
        eval=eval_data,
        device=device,
        progress=lambda f, s: progress(0.05 + 0.75 * f, s),
        should_stop=should_stop,
        seed=seed,
    )
    run_pipeline(ctx, steps)
    ctx.check_stop()

    progress(0.82, "evaluating result")
    result_m = evaluate.measure(ctx.module, eval_data, batch=latency_batch, iters=latency_iters)
    ctx.check_stop()

    progress(0.9, "exporting result")
    example = example_input(parent.signature, eval_data)
    path, fmt = save_result(
        ctx.module,
        example,
        out_dir,
        arch=ctx.arch,
        config=ctx.config,
        quantize=ctx.quantize,
        fp32_state=ctx.fp32_state,
    )
    _check_roundtrip(path, fmt, eval_data, result_m.accuracy)
    result_m.size_bytes = path.stat().st_size
    rep = evaluate.report(parent_m, result_m, batch=latency_batch, device=str(device))
    passed, reason = evaluate.gate(rep, max_accuracy_drop)
    labels = {k: v for k, v in parent.labels.items() if k not in _PARENT_ONLY_LABELS}
    if ctx.arch and ctx.quantize is None and ctx.dtype == "fp32":
        labels["arch"] = ctx.arch
        labels["arch_config"] = json.dumps(ctx.config, sort_keys=True)
    if ctx.quantize:
        labels["quantize"] = ctx.quantize
    if ctx.dtype != "fp32":
        labels["compute_dtype"] = ctx.dtype
    labels["accuracy"] = f"{result_m.accuracy:.4f}"
    return Outcome(
        path=path,
        format=fmt,
        report=rep,
        passed=passed,
        reason=reason,
        methods=list(ctx.methods),
        metrics=evaluate.metrics_map(parent_m, result_m, ctx.notes),
        labels=labels,
        # The artifact keeps the FP32 signature and casts inside, so the worker feeds it FP32.
        dtype="fp32",
    )


def _check_roundtrip(path: Path, fmt: str, data: Dataset, expected: float) -> None:
    """Loads the written artifact the way a worker does and checks it scores what the module scored."""
    if fmt != "torch_export":
        return
    module = load_program(path).module()
    got = evaluate.accuracy(module, data)
    if abs(got - expected) > 0.02:
        raise FailedPrecondition(f"export: the exported program scores {got:.4f}, the module {expected:.4f}")
