"""Compression methods, composable in order over one module (transport-free; see `run_pipeline`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from compressor.methods import distill as _distill
from compressor.methods import prune as _prune
from compressor.methods import quantize as _quant
from compressor.methods.base import CompressionContext, Dataset, Param, count_params, resolve_params
from mesh.errors import InvalidArgument

__all__ = [
    "METHODS",
    "CompressionContext",
    "Dataset",
    "MethodSpec",
    "StepSpec",
    "count_params",
    "run_pipeline",
    "validate_steps",
]

Apply = Callable[[CompressionContext, dict[str, float], dict[str, str]], None]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    apply: Apply
    kind: str
    """"train" (changes weights by training or pruning), "precision" (quantize or cast: last step only)."""
    params: Mapping[str, Param] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    required_options: tuple[str, ...] = ()
    needs_train_data: bool = False
    doc: str = ""


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec(
            "prune_unstructured",
            _prune.prune_unstructured,
            "train",
            _prune.UNSTRUCTURED_PARAMS,
            doc="global L1 magnitude pruning of every Linear weight, made permanent",
        ),
        MethodSpec(
            "prune_structured",
            _prune.prune_structured,
            "train",
            _prune.STRUCTURED_PARAMS,
            doc="removes whole hidden neurons (L1/L2 ranking), rebuilds smaller Linear layers",
        ),
        MethodSpec(
            "distill",
            _distill.distill,
            "train",
            _distill.DISTILL_PARAMS,
            _distill.DISTILL_OPTIONS,
            required_options=("student",),
            needs_train_data=True,
            doc="trains a smaller student on the teacher's soft targets",
        ),
        MethodSpec(
            "int8_dynamic",
            _quant.int8_dynamic,
            "precision",
            doc="torchao int8 weights + dynamic int8 activations",
        ),
        MethodSpec("int8_weight_only", _quant.int8_weight_only, "precision", doc="torchao int8 weights"),
        MethodSpec(
            "int8_static",
            _quant.int8_static,
            "precision",
            _quant.STATIC_PARAMS,
            needs_train_data=True,
            doc="torchao int8 weights + int8 activations with calibrated static scales",
        ),
        MethodSpec("fp16", _quant.fp16, "precision", doc="cast to float16 (FP32 signature kept)"),
        MethodSpec("bf16", _quant.bf16, "precision", doc="cast to bfloat16 (FP32 signature kept)"),
        MethodSpec(
            "float8_weight_only",
            _quant.float8_weight_only,
            "precision",
            doc="torchao float8 weights (CUDA, compute capability >= 8.9)",
        ),
        MethodSpec(
            "int4_weight_only",
            _quant.int4_weight_only,
            "precision",
            _quant.INT4_PARAMS,
            doc="torchao int4 weights (CUDA, compute capability >= 8.0)",
        ),
        MethodSpec(
            "sparse_2_4",
            _quant.sparse_2_4,
            "precision",
            doc="2:4 semi-structured sparsity (CUDA, compute capability >= 8.0)",
        ),
    ]
}


@dataclass(frozen=True)
class StepSpec:
    """One validated step: its method and its parameters with defaults filled in."""

    method: str
    params: dict[str, float]
    options: dict[str, str]


def validate_steps(
    steps: Sequence[tuple[str, Mapping[str, float], Mapping[str, str]]],
    *,
    device: torch.device,
    has_train_data: bool,
    structured_ok: bool = True,
) -> list[StepSpec]:
    """Checks every step before a job is queued; each error names its field (steps[i]....)."""
    if not steps:
        raise InvalidArgument("steps: give at least one step")
    out: list[StepSpec] = []
    precision_at: int | None = None
    for i, (method, params, options) in enumerate(steps):
        field_name = f"steps[{i}]"
        spec = METHODS.get(method)
        if spec is None:
            raise InvalidArgument(
                f"{field_name}.method: unknown method {method!r} (known: {', '.join(METHODS)})"
            )
        if precision_at is not None:
            raise InvalidArgument(
                f"{field_name}.method: {method} cannot follow steps[{precision_at}] "
                f"({steps[precision_at][0]}); quantization or a cast must be the last step"
            )
        resolved = resolve_params(spec.params, params, field_name)
        for key in sorted(options):
            if key not in spec.options:
                known = ", ".join(spec.options) or "none"
                raise InvalidArgument(f"{field_name}.options.{key}: unknown option (known: {known})")
        for key in spec.required_options:
            if not options.get(key, "").strip():
                raise InvalidArgument(f"{field_name}.options.{key}: required by {method}")
        if spec.needs_train_data and not has_train_data:
            raise InvalidArgument(
                f"{field_name}.method: {method} needs training data registered with the model "
                "(label train_data_uri)"
            )
        if method == "prune_structured" and not structured_ok:
            raise InvalidArgument(
                f"{field_name}.method: prune_structured needs a stack of Linear layers (a digits_mlp)"
            )
        if method == "distill":
            _distill.parse_student(options["student"], f"{field_name}.options.student")
            if int(resolved["processes"]) > 1 and device.type == "cuda":
                if torch.cuda.device_count() < int(resolved["processes"]):
                    raise InvalidArgument(
                        f"{field_name}.params.processes: {int(resolved['processes'])} DDP processes on CUDA "
                        f"need as many GPUs, this host has {torch.cuda.device_count()}"
                    )
        _quant.check_device(method, device, f"{field_name}.method")
        if spec.kind == "precision":
            precision_at = i
        out.append(StepSpec(method, resolved, dict(options)))
    return out


def run_pipeline(ctx: CompressionContext, steps: Sequence[StepSpec]) -> CompressionContext:
    """Applies the steps in order; `ctx.progress` receives the overall fraction across all steps."""
    outer = ctx.progress
    n = len(steps)
    for i, step in enumerate(steps):
        ctx.check_stop()

        def scaled(fraction: float, stage: str, i: int = i) -> None:
            outer((i + max(0.0, min(1.0, fraction))) / n, stage)

        ctx.progress = scaled
        try:
            scaled(0.0, f"{step.method} ({i + 1}/{n})")
            METHODS[step.method].apply(ctx, dict(step.params), dict(step.options))
        finally:
            ctx.progress = outer
        ctx.methods.append(step.method)
    return ctx
