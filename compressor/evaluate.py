"""Evaluation and gate: accuracy, size, parameters and latency of parent and result, side by side."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from compressor.methods.base import Dataset, count_params, eval_mode, module_device
from mesh_pb import compressor_pb2


@dataclass
class Measurement:
    """Figures of one module."""

    accuracy: float
    latency_ms: float
    params: int
    linear_weight_bytes: int
    size_bytes: int = 0


@torch.inference_mode()
def predict(module: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits of `module` over float32 rows x, computed on the module's device, as float32 numpy."""
    eval_mode(module)
    device = module_device(module)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    outs = [module(xt[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(xt), batch_size)]
    return torch.cat(outs).numpy()


def accuracy(module: nn.Module, data: Dataset) -> float:
    """Top-1 accuracy on (x, y)."""
    if len(data) == 0:
        return 0.0
    return float((predict(module, data.x).argmax(axis=1) == np.asarray(data.y)).mean())


@torch.inference_mode()
def latency_ms(
    module: nn.Module, example: torch.Tensor, *, iters: int = 200, repeats: int = 5, warmup: int = 20
) -> float:
    """Median over `repeats` of the mean time of one forward pass of `example`, in milliseconds."""
    eval_mode(module)
    device = module_device(module)
    x = example.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        module(x)
    sync()
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            module(x)
        sync()
        means.append((time.perf_counter() - t0) * 1000.0 / iters)
    return float(statistics.median(means))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really stores; a torchao tensor subclass counts its inner tensors (int8 data, scales)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = flatten()
        return sum(
            tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n, None), torch.Tensor)
        )
    return int(t.numel() * t.element_size())


def linear_weight_bytes(module: nn.Module) -> int:
    """Bytes held by the weights of every Linear layer (the figure quantization shrinks)."""
    return sum(tensor_bytes(m.weight) for m in module.modules() if isinstance(m, nn.Linear))


def measure(module: nn.Module, data: Dataset, *, batch: int = 64, iters: int = 200) -> Measurement:
    """Accuracy on `data`, latency at `batch` rows (taken from data, repeated if short), params, weight bytes."""
    rows = np.resize(np.asarray(data.x, dtype=np.float32), (batch, *np.asarray(data.x).shape[1:]))
    return Measurement(
        accuracy=accuracy(module, data),
        latency_ms=latency_ms(module, torch.as_tensor(rows), iters=iters),
        params=count_params(module),
        linear_weight_bytes=linear_weight_bytes(module),
    )


def report(parent: Measurement, result: Measurement, *, batch: int, device: str) -> compressor_pb2.EvalReport:
    return compressor_pb2.EvalReport(
        parent_accuracy=parent.accuracy,
        accuracy=result.accuracy,
        parent_size_bytes=parent.size_bytes,
        size_bytes=result.size_bytes,
        parent_latency_ms=parent.latency_ms,
        latency_ms=result.latency_ms,
        parent_params=parent.params,
        params=result.params,
        latency_batch=batch,
        device=device,
    )


def gate(rep: compressor_pb2.EvalReport, max_accuracy_drop: float) -> tuple[bool, str]:
    """(passed, reason): fails when the accuracy drop exceeds max_accuracy_drop (a fraction)."""
    drop = rep.parent_accuracy - rep.accuracy
    if drop > max_accuracy_drop + 1e-9:
        return False, (
            f"accuracy {rep.accuracy:.4f} is {drop * 100:.2f} points below the parent's "
            f"{rep.parent_accuracy:.4f}; the job allows {max_accuracy_drop * 100:.2f}"
        )
    return True, (
        f"accuracy {rep.accuracy:.4f} (parent {rep.parent_accuracy:.4f}, drop {drop * 100:.2f} points, "
        f"allowed {max_accuracy_drop * 100:.2f})"
    )


def metrics_map(parent: Measurement, result: Measurement, notes: dict[str, float]) -> dict[str, float]:
    """Lineage metrics of a result, parent figures prefixed with parent_."""
    out = {
        "accuracy": result.accuracy,
        "parent_accuracy": parent.accuracy,
        "accuracy_drop": parent.accuracy - result.accuracy,
        "size_bytes": float(result.size_bytes),
        "parent_size_bytes": float(parent.size_bytes),
        "latency_ms": result.latency_ms,
        "parent_latency_ms": parent.latency_ms,
        "params": float(result.params),
        "parent_params": float(parent.params),
        "linear_weight_bytes": float(result.linear_weight_bytes),
        "parent_linear_weight_bytes": float(parent.linear_weight_bytes),
    }
    out.update(notes)
    return out
