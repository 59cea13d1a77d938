"""Exact rewrites of an exported program's graph, made once at load for the worker's direct graph call.

A small model's forward pass on a CPU is mostly per-operator overhead (each aten call is a dispatcher
round trip), so every operator the graph does not need is worth dropping. The rewrites here change no
result, bit for bit:

- a scalar multiply of a model input by a power of two, feeding one linear layer only, is folded into
  that layer's weight (scaling by a power of two is exact, so (x·c)·Wᵀ = x·(c·W)ᵀ);
- `linear` on a 2-D input becomes `addmm` (or `mm`) on a transposed view of the weight made once: what
  `linear` itself calls for 2-D inputs, minus a transpose per call;
- `relu` of a fresh intermediate result that nothing else reads runs in place (no new tensor).

The runtime checks the rewritten graph against the original on random inputs before using it
(`TorchExportRuntime.load`), and keeps the original graph if they differ.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, TypeGuard

import torch
from torch import fx

_aten = torch.ops.aten
# Operators whose result is a new tensor (never a view of an input), so it may be overwritten in place.
_FRESH = frozenset(
    {
        _aten.addmm.default,
        _aten.mm.default,
        _aten.linear.default,
        _aten.convolution.default,
        _aten.conv2d.default,
        _aten.add.Tensor,
        _aten.mul.Tensor,
    }
)


def _power_of_two(value: object) -> TypeGuard[int | float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    value = float(value)
    return value != 0.0 and math.isfinite(value) and math.frexp(value)[0] in (0.5, -0.5)


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return bool(schema is not None and schema.is_mutable)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, values: Sequence[Any | None], user_inputs: set[int]) -> None:
        self.gm = gm
        self.graph = gm.graph
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        # Constant tensors by node: parameters, buffers and constants passed in at every call.
        self.constants: dict[fx.Node, torch.Tensor] = {
            node: value
            for i, (node, value) in enumerate(zip(placeholders, values, strict=True))
            if i not in user_inputs and isinstance(value, torch.Tensor)
        }
        self.inputs = {placeholders[i] for i in user_inputs}
        self.count = 0
        self._attrs = 0

    def _calls(self, target: Any) -> list[fx.Node]:
        """The graph's calls of `target` without keyword arguments, listed before any is rewritten."""
        return [
            n for n in self.graph.nodes if n.op == "call_function" and n.target is target and not n.kwargs
        ]

    def _attr(self, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
        name = f"_graphopt_{self._attrs}"
        self._attrs += 1
        self.gm.register_buffer(name, tensor, persistent=False)
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(name)
        node.meta["val"] = tensor
        self.constants[node] = tensor
        return node

    def fold_input_scales(self) -> None:
        for node in self._calls(_aten.mul.Tensor):
            if len(node.args) != 2:
                continue
            x, scale = node.args
            if x not in self.inputs or not _power_of_two(scale) or len(node.users) != 1:
                continue
            (linear,) = node.users
            if linear.target is not _aten.linear.default or linear.args[0] is not node or linear.kwargs:
                continue
            weight = linear.args[1]
            if not isinstance(weight, fx.Node) or len(weight.users) != 1:
                continue
            value = self.constants.get(weight)
            if value is None or not value.is_floating_point():
                continue
            folded = self._attr(value * scale, linear)
            linear.args = (x, folded, *linear.args[2:])
            self.graph.erase_node(node)
            self.count += 1

    def linear_to_addmm(self) -> None:
        for node in self._calls(_aten.linear.default):
            x, weight = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else None
            x_val = _val(x)
            w_val = self.constants.get(weight) if isinstance(weight, fx.Node) else None
            if w_val is None or w_val.dim() != 2 or not isinstance(x_val, torch.Tensor) or x_val.dim() != 2:
                continue
            b_val = _val(bias)
            if bias is not None and (b_val is None or b_val.dim() != 1):
                continue
            transposed = self._attr(w_val.t(), node)
            with self.graph.inserting_before(node):
                if bias is None:
                    new = self.graph.call_function(_aten.mm.default, (x, transposed))
                else:
                    new = self.graph.call_function(_aten.addmm.default, (bias, x, transposed))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            self.graph.erase_node(node)
            self.count += 1

    def relu_in_place(self) -> None:
        for node in self._calls(_aten.relu.default):
            (source,) = node.args
            if not isinstance(source, fx.Node) or source.op != "call_function" or source.target not in _FRESH:
                continue
            if len(source.users) != 1:
                continue
            node.target = _aten.relu_.default
            self.count += 1


def optimize(
    gm: fx.GraphModule, values: Sequence[Any | None], user_inputs: Sequence[int]
) -> tuple[fx.GraphModule, int]:
    """A rewritten copy of `gm` and the number of rewrites made (0: the copy is unchanged).

    `values`: each placeholder's tensor (parameters, buffers, constants), in placeholder order;
    `user_inputs`: the positions of the model's own inputs among the placeholders.
    """
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    if any(_mutates(node) for node in new.graph.nodes):
        # A graph that updates state in place (a counter, a cache) is left as it is: checking a
        # rewrite means running it, which would update that state.
        return new, 0
    rewriter = _Rewriter(new, values, set(user_inputs))
    rewriter.fold_input_scales()
    rewriter.linear_to_addmm()
    rewriter.relu_in_place()
    if rewriter.count:
        new.graph.eliminate_dead_code()
        new.graph.lint()
        new.recompile()
    return new, rewriter.count


def extra_bytes(gm: fx.GraphModule, values: Sequence[Any | None]) -> int:
    """Bytes of the storage `gm`'s own tensors hold beyond that of `values` (weights a rewrite copied)."""
    known = {v.untyped_storage().data_ptr() for v in values if isinstance(v, torch.Tensor)}
    seen: set[int] = set()
    total = 0
    for tensor in gm.buffers():
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in known and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
