"""Exact graph rewrites (workers/graphopt.py): what is rewritten, what is left alone, bit-equal outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mesh.store import ArtifactStore
from tests.integration.test_worker_support import export_record
from workers import graphopt
from workers.runtimes import TorchExportRuntime, load_runtime, module_memory_bytes

aten = torch.ops.aten


class Scaled(nn.Module):
    """An input scaled by a power of two into a linear layer, a bias-free layer, two relus."""

    def __init__(self, scale: float = 0.0625) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.scale = scale
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x * self.scale))).relu()


class LeftAlone(nn.Module):
    """Nothing here may be rewritten: a relu of the input itself, a linear on a 3-D input, a relu of a
    result that another op reads too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.a(seq)  # 3-D: linear stays
        y = torch.mm(x, x.t())
        return torch.relu(x), torch.relu(y) + y, h


def _program(module: nn.Module, *example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=64)
    shapes = tuple({0: batch} for _ in example)
    return torch.export.export(module.eval(), example, dynamic_shapes=shapes)


def _lifted_values(ep: torch.export.ExportedProgram) -> tuple[list[torch.Tensor | None], list[int]]:
    from torch.export.graph_signature import InputKind

    state = {**ep.state_dict, **ep.constants}
    values: list[torch.Tensor | None] = []
    inputs: list[int] = []
    for i, s in enumerate(ep.graph_signature.input_specs):
        if s.kind == InputKind.USER_INPUT:
            inputs.append(i)
            values.append(None)
        else:
            values.append(state[s.target])
    return values, inputs


def _call(
    gm: torch.fx.GraphModule, values: list[torch.Tensor | None], inputs: list[int], *args: torch.Tensor
):
    full = list(values)
    for slot, arg in zip(inputs, args, strict=True):
        full[slot] = arg
    with torch.inference_mode():
        return gm.forward(*full)


def _targets(gm: torch.fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_scale_folded_linear_to_addmm_relu_in_place() -> None:
    ep = _program(Scaled(), torch.zeros(2, 8))
    values, inputs = _lifted_values(ep)
    new, count = graphopt.optimize(ep.graph_module, values, inputs)
    assert count == 5  # one fold, two linears, two relus
    assert _targets(new) == [aten.addmm.default, aten.relu_.default, aten.mm.default, aten.relu_.default]
    # The model's own weights are untouched; the folded copy is the only new storage.
    assert graphopt.extra_bytes(new, values) == 16 * 8 * 4
    x = torch.randn(5, 8) * 16
    before = x.clone()
    expected = _call(ep.graph_module, values, inputs, x)
    got = _call(new, values, inputs, x)
    assert torch.equal(expected[0], got[0])
    assert torch.equal(x, before)  # the input was not written to


def test_a_scale_that_is_not_a_power_of_two_is_not_folded() -> None:
    ep = _program(Scaled(scale=0.3), torch.zeros(2, 8))
    values, inputs = _lifted_values(ep)
    new, _ = graphopt.optimize(ep.graph_module, values, inputs)
    assert aten.mul.Tensor in _targets(new)
    assert graphopt.extra_bytes(new, values) == 0
    x = torch.randn(5, 8)
    assert torch.equal(_call(ep.graph_module, values, inputs, x)[0], _call(new, values, inputs, x)[0])


def test_inputs_views_shared_results_and_3d_linears_are_left_alone() -> None:
    ep = _program(LeftAlone(), torch.zeros(2, 8), torch.zeros(2, 3, 8))
    values, inputs = _lifted_values(ep)
    new, count = graphopt.optimize(ep.graph_module, values, inputs)
    assert count == 0
    assert aten.relu_.default not in _targets(new)
    assert aten.linear.default in _targets(new)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_runtime_serves_the_rewritten_graph(store: ArtifactStore, tmp_path: Path, dtype: str) -> None:
    module = Scaled()
    rec = export_record(store, tmp_path / "m.pt2", module, 8, 4, dtype)
    rt = load_runtime(rec, store.resolve(rec.artifact_uri), torch.device("cpu"))
    assert isinstance(rt, TorchExportRuntime) and rt._lifted is not None
    width = 4 if dtype == "fp32" else 2
    # The folded weight is counted against the memory budget.
    assert rt.memory_bytes == module_memory_bytes(module) // (4 // width) + 16 * 8 * width
    x = (np.random.default_rng(1).uniform(0, 16, (3, 8))).astype(np.float32)
    x.flags.writeable = False
    rewritten = rt.forward({"x": x})["y"]
    rt._lifted = None  # the module path: the original program
    np.testing.assert_array_equal(rewritten, rt.forward({"x": x})["y"])
    # MAAS_WORKER_GRAPH_REWRITES=false: the graph as saved, no copied weight.
    plain = load_runtime(rec, store.resolve(rec.artifact_uri), torch.device("cpu"), graph_rewrites=False)
    assert plain.memory_bytes == module_memory_bytes(module) // (4 // width)
    np.testing.assert_array_equal(rewritten, plain.forward({"x": x})["y"])


class CountingLinear(nn.Module):
    """Updates a buffer in place on every call, beside layers that could be rewritten."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("calls", torch.zeros(()))
        self.a = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)  # type: ignore[operator]
        return torch.relu(self.a(x))


def test_a_graph_that_updates_state_is_not_rewritten(store: ArtifactStore, tmp_path: Path) -> None:
    ep = _program(CountingLinear(), torch.zeros(2, 8))
    values, inputs = _lifted_values(ep)
    assert graphopt.optimize(ep.graph_module, values, inputs)[1] == 0
    # Loaded by the runtime: no check run behind its back, so the buffer counts real calls only.
    rec = export_record(store, tmp_path / "m.pt2", CountingLinear(), 8, 4)
    rt = load_runtime(rec, store.resolve(rec.artifact_uri), torch.device("cpu"))
    assert isinstance(rt, TorchExportRuntime) and rt._lifted is not None
    x = np.ones((2, 8), dtype=np.float32)
    for _ in range(3):
        rt.forward({"x": x})
    module = rt.module
    assert isinstance(module, nn.Module)
    assert float(module.get_buffer("calls")) == 3 + 1  # + the warm-up call


class LogAndLinear(nn.Module):
    """NaN outputs on negative inputs (log), beside a layer that is rewritten."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.a(x)), torch.log(x)


def test_nan_outputs_do_not_count_as_a_difference() -> None:
    from workers.runtimes import _optimized_forward

    ep = _program(LogAndLinear(), torch.zeros(2, 8))
    values, inputs = _lifted_values(ep)
    sample = torch.randn(3, 8)  # negatives: log gives NaN in both graphs
    assert bool(torch.log(sample).isnan().any())
    optimized = _optimized_forward(ep.graph_module, values, inputs, lambda: [sample])
    assert optimized is not None
    forward, extra = optimized
    assert extra == 0
    got = forward(*[sample if v is None else v for v in values])
    assert torch.equal(got[0], _call(ep.graph_module, values, inputs, sample)[0])
