"""Shared pieces of the compression methods: the pipeline context, parameter specs, fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mesh.errors import Cancelled, InvalidArgument

ProgressFn = Callable[[float, str], None]
"""progress(fraction of the current step in 0..1, stage text)."""


@dataclass
class Dataset:
    """Arrays of one split: x float32 [N, ...], y int64 [N]."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class CompressionContext:
    """The module being compressed and what the methods may use; methods update it in place."""

    module: nn.Module
    arch: str | None = None
    """Architecture name for `workers.models.build` (e.g. "digits_mlp"); None when not rebuildable."""
    config: dict[str, Any] = field(default_factory=dict)
    train: Dataset | None = None
    eval: Dataset | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    quantize: str | None = None
    """Name of the torchao quantization applied (recorded so a `module_state` artifact can re-apply it)."""
    fp32_state: dict[str, torch.Tensor] | None = None
    """Weights just before quantization (so a `module_state` artifact can re-apply the recipe at load)."""
    dtype: str = "fp32"
    """Compute dtype of the result: fp32, fp16 or bf16."""
    methods: list[str] = field(default_factory=list)
    """Methods applied so far, in order."""
    notes: dict[str, float] = field(default_factory=dict)
    """Figures the methods report (e.g. achieved sparsity); they end up in the lineage metrics."""
    progress: ProgressFn = field(default=lambda fraction, stage: None)
    should_stop: Callable[[], bool] = field(default=lambda: False)
    seed: int = 0

    def check_stop(self) -> None:
        if self.should_stop():
            raise Cancelled("job: cancelled")

    def require_train(self, field_name: str) -> Dataset:
        if self.train is None or len(self.train) == 0:
            raise InvalidArgument(
                f"{field_name}: needs training data registered with the model (train_data_uri)"
            )
        return self.train


@dataclass(frozen=True)
class Param:
    """One numeric parameter of a method: default and allowed range."""

    default: float
    low: float
    high: float
    low_inclusive: bool = True
    high_inclusive: bool = True
    integer: bool = False
    choices: tuple[float, ...] = ()
    doc: str = ""

    def check(self, value: float, field_name: str) -> float:
        if not math.isfinite(value):
            raise InvalidArgument(f"{field_name}: must be a finite number, got {value}")
        if self.choices:
            if value not in self.choices:
                allowed = ", ".join(f"{c:g}" for c in self.choices)
                raise InvalidArgument(f"{field_name}: must be one of {allowed}, got {value:g}")
            return value
        lo_ok = value >= self.low if self.low_inclusive else value > self.low
        hi_ok = value <= self.high if self.high_inclusive else value < self.high
        if not (lo_ok and hi_ok):
            lb = "[" if self.low_inclusive else "("
            hb = "]" if self.high_inclusive else ")"
            raise InvalidArgument(
                f"{field_name}: must be in {lb}{self.low:g}, {self.high:g}{hb}, got {value:g}"
            )
        if self.integer and value != int(value):
            raise InvalidArgument(f"{field_name}: must be an integer, got {value:g}")
        return value


def resolve_params(
    specs: Mapping[str, Param], given: Mapping[str, float], field_prefix: str
) -> dict[str, float]:
    """Checks `given` against `specs` (unknown names and bad values name their field); fills defaults."""
    out: dict[str, float] = {}
    for name in sorted(given):
        if name not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise InvalidArgument(f"{field_prefix}.params.{name}: unknown parameter (known: {known})")
        out[name] = specs[name].check(float(given[name]), f"{field_prefix}.params.{name}")
    for name, spec in specs.items():
        out.setdefault(name, spec.default)
    return out


def module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def eval_mode(module: nn.Module) -> nn.Module:
    """module.eval(), tolerating modules from torch.export that refuse it (they are traced in eval mode)."""
    try:
        module.eval()
    except NotImplementedError:
        pass
    return module


def count_params(module: nn.Module) -> int:
    """Logical parameter count (a quantized weight counts its logical shape)."""
    return int(sum(p.numel() for p in module.parameters()))


def fine_tune(
    ctx: CompressionContext,
    module: nn.Module,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    stage: str = "fine-tune",
    field_name: str = "steps",
) -> None:
    """A short supervised fine-tune of `module` on the training data (cross entropy)."""
    if epochs <= 0:
        return
    train = ctx.require_train(field_name)
    dev = ctx.device
    module.to(dev).train()
    xt = torch.as_tensor(train.x, dtype=torch.float32, device=dev)
    yt = torch.as_tensor(train.y, dtype=torch.long, device=dev)
    gen = torch.Generator().manual_seed(ctx.seed)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        ctx.check_stop()
        perm = torch.randperm(len(xt), generator=gen).to(dev)
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            loss = loss_fn(module(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ctx.progress((epoch + 1) / epochs, f"{stage} epoch {epoch + 1}/{epochs}")
    module.eval()
