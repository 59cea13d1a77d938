"""Quantization with torchao (int8 dynamic / weight-only / static, float8, int4, 2:4) and dtype casts."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compressor.methods.base import CompressionContext, Param
from mesh.errors import FailedPrecondition, InvalidArgument

logger = logging.getLogger(__name__)

STATIC_PARAMS: dict[str, Param] = {
    "calibration_samples": Param(512, 1, 1_000_000, integer=True, doc="training rows used to calibrate"),
}
INT4_PARAMS: dict[str, Param] = {
    "group_size": Param(32, 32, 256, choices=(32.0, 64.0, 128.0, 256.0), doc="weights per int4 scale"),
}

# torchao configs that a `module_state` artifact can name in "quantize" and the worker re-applies at load.
REAPPLICABLE = ("int8_dynamic", "int8_weight_only")


class CastModule(nn.Module):
    """Runs `inner` in a lower precision while the signature stays FP32 in and FP32 out."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).float()


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def check_device(method: str, device: torch.device, field_name: str) -> None:
    """Refuses methods the target device cannot run, with the reason."""
    need = {"float8_weight_only": (8, 9), "int4_weight_only": (8, 0), "sparse_2_4": (8, 0)}.get(method)
    if need is None:
        return
    cap = cuda_capability(device)
    if cap is None:
        raise InvalidArgument(
            f"{field_name}: {method} needs a CUDA GPU (compute capability >= {need[0]}.{need[1]}); "
            f"the job's device is {device.type}"
        )
    if cap < need:
        raise InvalidArgument(
            f"{field_name}: {method} needs compute capability >= {need[0]}.{need[1]}, "
            f"this GPU has {cap[0]}.{cap[1]}"
        )


def torchao_config(name: str, **kwargs: Any) -> Any:
    """The torchao config object for a method name (int8_dynamic, int8_weight_only, ...)."""
    from torchao import quantization as q

    if name == "int8_dynamic":
        return q.Int8DynamicActivationInt8WeightConfig()
    if name == "int8_weight_only":
        return q.Int8WeightOnlyConfig()
    if name == "float8_weight_only":
        return q.Float8WeightOnlyConfig()
    if name == "int4_weight_only":
        return q.Int4WeightOnlyConfig(group_size=int(kwargs.get("group_size", 32)))
    raise InvalidArgument(f"quantize: unknown torchao quantization '{name}'")


def apply_named_quantization(module: nn.Module, name: str) -> nn.Module:
    """Re-applies a reapplicable quantization by name (for loaders of `module_state` artifacts)."""
    from torchao.quantization import quantize_

    if name not in REAPPLICABLE:
        raise InvalidArgument(
            f"quantize: '{name}' cannot be re-applied at load (known: {', '.join(REAPPLICABLE)})"
        )
    quantize_(module, torchao_config(name))
    return module


def _quantize_torchao(ctx: CompressionContext, name: str, **kwargs: Any) -> None:
    from torchao.quantization import quantize_

    module = ctx.module
    if name in ("float8_weight_only", "int4_weight_only"):
        # GPU weight-only kernels run in bf16.
        module = module.to(device=ctx.device, dtype=torch.bfloat16)
        ctx.dtype = "bf16"
    else:
        module = module.cpu() if ctx.device.type == "cpu" else module.to(ctx.device)
    module.eval()
    ctx.fp32_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    quantize_(module, torchao_config(name, **kwargs), filter_fn=_quantizable_linear)
    ctx.module = module if ctx.dtype == "fp32" else CastModule(module, torch.bfloat16)
    ctx.quantize = name


def _quantizable_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def int8_dynamic(ctx: CompressionContext, params: dict[str, float], options: dict[str, str]) -> None:
    """int8 weights and dynamically quantized int8 activations (torchao)."""
    _quantize_torchao(ctx, "int8_dynamic")
    ctx.progress(1.0, "int8 dynamic quantization applied")


def int8_weight_only(ctx: CompressionContext, params: dict[str, float], options: dict[str, str]) -> None:
    """int8 weights, activations in floating point (torchao)."""
    _quantize_torchao(ctx, "int8_weight_only")
    ctx.progress(1.0, "int8 weight-only quantization applied")


def float8_weight_only(ctx: CompressionContext, params: dict[str, float], options: dict[str, str]) -> None:
    check_device("float8_weight_only", ctx.device, "steps")
    _quantize_torchao(ctx, "float8_weight_only")
    ctx.progress(1.0, "float8 weight-only quantization applied")


def int4_weight_only(ctx: CompressionContext, params: dict[str, float], options: dict[str, str]) -> None:
    check_device("int4_weight_only", ctx.device, "steps")
    _quantize_torchao(ctx, "int4_weight_only", group_size=params["group_size"])
    ctx.progress(1.0, "int4 weight-only quantization applied")


@torch.no_grad()
def int8_static(ctx: CompressionContext, params: dict[str, float], options: dict[str, str]) -> None:
    """int8 weights and int8 activations with per-tensor scales calibrated on training rows (torchao)."""
    from torchao.quantization import Int8StaticActivationInt8WeightConfig, quantize_
    from torchao.quantization.granularity import PerRow, PerTensor

    train = ctx.require_train("steps")
    module = ctx.module.cpu().eval()
    n = min(len(train), int(params["calibration_samples"]))
    x = torch.as_tensor(train.x[:n], dtype=torch.float32)
    absmax: dict[str, float] = {}

    def observe(name: str) -> Any:
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            absmax[name] = max(absmax.get(name, 0.0), float(inputs[0].detach().abs().max()))

        return hook

    hooks = [
        m.register_forward_pre_hook(observe(name))
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
    ]
    try:
        for i in range(0, n, 256):
            module(x[i : i + 256])
    finally:
        for h in hooks:
            h.remove()
    ctx.progress(0.5, f"calibrated {len(absmax)} Linear inputs on {n} rows")
    for name, amax in absmax.items():
        scale = torch.tensor([[max(amax, 1e-8) / 127.0]], dtype=torch.float32)
        config = Int8StaticActivationInt8WeightConfig(
            act_quant_scale=scale, granularity=[PerTensor(), PerRow()], set_inductor_config=False
        )
        quantize_(module, config, filter_fn=lambda m, fqn, name=name: fqn == name)
    ctx.module = module
    ctx.quantize = "int8_static"
    ctx.progress(1.0, "int8 static quantization applied")


def fp16(ctx: CompressionContext, params: dict[str, float], options: dict[str, str]) -> None:
    ctx.module = CastModule(
        ctx.module.cpu() if ctx.device.type == "cpu" else ctx.module, torch.float16
    ).eval()
    ctx.dtype = "fp16"
    ctx.progress(1.0, "cast to fp16")


def bf16(ctx: CompressionContext, params: dict[str, float], options: dict[str, str]) -> None:
    ctx.module = CastModule(
        ctx.module.cpu() if ctx.device.type == "cpu" else ctx.module, torch.bfloat16
    ).eval()
    ctx.dtype = "bf16"
    ctx.progress(1.0, "cast to bf16")


@torch.no_grad()
def sparse_2_4(ctx: CompressionContext, params: dict[str, float], options: dict[str, str]) -> None:
    """2:4 semi-structured sparsity (magnitude) with the sparse GPU kernels (torchao.sparsity)."""
    check_device("sparse_2_4", ctx.device, "steps")
    from torchao.sparsity import SemiSparseWeightConfig, sparsify_

    module = ctx.module.to(device=ctx.device, dtype=torch.float16).eval()
    eligible = {
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and m.out_features % 32 == 0 and m.in_features % 64 == 0
    }
    if not eligible:
        raise FailedPrecondition("steps: sparse_2_4 found no Linear layer with shapes the 2:4 kernels accept")
    for name in eligible:
        lin = module.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        w = lin.weight
        groups = w.reshape(-1, 4)
        drop = groups.abs().argsort(dim=1)[:, :2]
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(1, drop, False)
        w.copy_((groups * mask).reshape(w.shape))
    sparsify_(module, SemiSparseWeightConfig(), filter_fn=lambda m, fqn: fqn in eligible)
    ctx.module = CastModule(module, torch.float16)
    ctx.dtype = "fp16"
    ctx.quantize = "sparse_2_4"
    ctx.progress(1.0, f"2:4 sparsity on {len(eligible)} Linear layers")
