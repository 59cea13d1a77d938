"""Pruning: global unstructured magnitude pruning, and structured removal of whole hidden neurons."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from compressor.methods.base import CompressionContext, Param, fine_tune
from mesh.errors import InvalidArgument

logger = logging.getLogger(__name__)

UNSTRUCTURED_PARAMS: dict[str, Param] = {
    "sparsity": Param(
        0.5, 0.0, 1.0, low_inclusive=False, high_inclusive=False, doc="fraction of weights zeroed"
    ),
    "epochs": Param(0, 0, 1000, integer=True, doc="fine-tune epochs with the masks held"),
    "lr": Param(1e-3, 0.0, 1.0, low_inclusive=False, doc="fine-tune learning rate"),
}

STRUCTURED_PARAMS: dict[str, Param] = {
    "sparsity": Param(
        0.5,
        0.0,
        1.0,
        low_inclusive=False,
        high_inclusive=False,
        doc="fraction of each hidden layer's neurons removed",
    ),
    "norm": Param(2, 1, 2, choices=(1.0, 2.0), doc="ranking norm of a neuron's weights (1 = L1, 2 = L2)"),
    "epochs": Param(5, 0, 1000, integer=True, doc="fine-tune epochs after the neurons are removed"),
    "lr": Param(1e-3, 0.0, 1.0, low_inclusive=False, doc="fine-tune learning rate"),
}

# Modules that act elementwise, so a hidden neuron can be removed across them.
_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Dropout, nn.Identity)


def linear_layers(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def linear_chain(module: nn.Module) -> list[tuple[str, nn.Linear]] | None:
    """The Linear layers when the module is a plain stack (Linear, elementwise, Linear, ...), else None."""
    leaves = [(n, m) for n, m in module.named_modules() if len(list(m.children())) == 0]
    linears = [(n, m) for n, m in leaves if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        return None
    for _, m in leaves:
        if not isinstance(m, (nn.Linear, *_ELEMENTWISE)):
            return None
    for (_, a), (_, b) in itertools.pairwise(linears):
        if a.out_features != b.in_features:
            return None
    return linears


def check_structured(module: nn.Module, field_name: str) -> None:
    if linear_chain(module) is None:
        raise InvalidArgument(
            f"{field_name}: structured pruning needs a stack of Linear layers with elementwise activations"
        )


def prune_unstructured(ctx: CompressionContext, params: dict[str, float], options: dict[str, str]) -> None:
    """Global L1 magnitude pruning over every Linear weight, made permanent with prune.remove."""
    module = ctx.module
    targets = [(m, "weight") for _, m in linear_layers(module)]
    if not targets:
        raise InvalidArgument("steps: prune_unstructured found no Linear layer to prune")
    sparsity = float(params["sparsity"])
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    ctx.progress(0.2, f"pruned {sparsity:.0%} of Linear weights")
    fine_tune(ctx, module, epochs=int(params["epochs"]), lr=float(params["lr"]), stage="prune fine-tune")
    for m, name in targets:
        prune.remove(m, name)
    module.cpu().eval()
    total = sum(m.weight.numel() for m, _ in targets)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    ctx.notes["weight_sparsity"] = zeros / total
    ctx.progress(1.0, f"unstructured sparsity {zeros / total:.1%}")


def _replace(root: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def shrink_linear_chain(module: nn.Module, sparsity: float, p: int) -> list[int]:
    """Removes the lowest-norm hidden neurons of each hidden Linear in place; returns the new hidden sizes."""
    chain = linear_chain(module)
    if chain is None:
        raise InvalidArgument("steps: prune_structured needs a stack of Linear layers")
    keep_idx: torch.Tensor | None = None
    new_hidden: list[int] = []
    for i, (name, lin) in enumerate(chain):
        weight = lin.weight.detach()
        bias = lin.bias.detach() if lin.bias is not None else None
        if keep_idx is not None:
            weight = weight[:, keep_idx]
        last = i == len(chain) - 1
        if last:
            out_keep = torch.arange(weight.shape[0])
        else:
            rows = torch.cat([weight, bias[:, None]], dim=1) if bias is not None else weight
            scores = rows.norm(p=p, dim=1)
            keep = max(1, round(weight.shape[0] * (1.0 - sparsity)))
            out_keep = torch.sort(torch.topk(scores, keep).indices).values
            new_hidden.append(keep)
        new = nn.Linear(weight.shape[1], len(out_keep), bias=bias is not None)
        new.weight.copy_(weight[out_keep])
        if bias is not None and new.bias is not None:
            new.bias.copy_(bias[out_keep])
        _replace(module, name, new)
        keep_idx = out_keep
    return new_hidden


def prune_structured(ctx: CompressionContext, params: dict[str, float], options: dict[str, str]) -> None:
    """Removes whole hidden neurons (L1/L2 ranking), then optionally fine-tunes the smaller stack."""
    module = ctx.module.cpu()
    new_hidden = shrink_linear_chain(module, float(params["sparsity"]), int(params["norm"]))
    if ctx.arch == "digits_mlp":
        # Rebuild as a real digits_mlp with the smaller hidden sizes, so the artifact's config says so.
        config: dict[str, Any] = dict(ctx.config)
        config["hidden"] = new_hidden
        from workers.models import build

        rebuilt = build(ctx.arch, config)
        rebuilt.load_state_dict(module.state_dict())
        module = rebuilt
        ctx.config = config
    ctx.module = module.eval()
    ctx.notes["hidden_after_prune"] = float(sum(new_hidden))
    ctx.progress(0.3, f"hidden sizes now {new_hidden}")
    fine_tune(ctx, ctx.module, epochs=int(params["epochs"]), lr=float(params["lr"]), stage="prune fine-tune")
    ctx.module.cpu().eval()
    ctx.progress(1.0, f"structured pruning done, hidden {new_hidden}")
