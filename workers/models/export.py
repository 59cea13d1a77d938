"""torch.export helpers: save a module as a .pt2 with a dynamic batch dimension, load it back."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Name of the forward pre-hook torch.export installs on `.module()` to check every call's inputs.
_INPUT_CHECK_HOOK = "_check_input_constraints_pre_hook"


def export_module(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    path: str | Path,
    dynamic_batch: bool = True,
    max_batch: int | None = None,
) -> Path:
    """Export `module` (eval mode, on CPU) with torch.export and save it to `path` (.pt2).

    With `dynamic_batch`, dim 0 of every input is a symbolic `batch` Dim (1..max_batch, unbounded by
    default); every other dim is fixed to the example's. An example batch of 1 is repeated to 2 first,
    because torch.export specialises size-1 dims. The module is exported from a CPU copy so the
    artifact loads on any device; the caller's module is left untouched. Returns the path.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs:
        raise ValueError("example_inputs: at least one tensor is required")
    mod = module
    if any(t.device.type != "cpu" for t in [*module.parameters(), *module.buffers()]):
        mod = copy.deepcopy(module).cpu()
    was_training = mod.training
    mod.eval()
    inputs = tuple(t.detach().cpu() for t in inputs)
    dynamic_shapes = None
    if dynamic_batch:
        inputs = tuple(t.repeat(2, *([1] * (t.dim() - 1))) if t.shape[0] == 1 else t for t in inputs)
        batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    try:
        with torch.no_grad():
            program = torch.export.export(mod, inputs, dynamic_shapes=dynamic_shapes)
    finally:
        mod.train(was_training)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(out))
    logger.info("exported %s to %s", type(module).__name__, out)
    return out


# torch.export.load keeps its deserializer in a module-level global: two loads in threads of one process
# fail ("_CURRENT_DESERIALIZER is already set"). Every load in the mesh goes through this lock.
_LOAD_LOCK = threading.Lock()


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """torch.export.load, serialised across threads of this process."""
    with _LOAD_LOCK:
        return torch.export.load(str(path))


def load_exported(
    path: str | Path, device: str | torch.device | None = None, check_inputs: bool = True
) -> nn.Module:
    """Load a .pt2 saved by `export_module` and return its callable module (optionally moved).

    `check_inputs=False` drops torch.export's per-call input-constraint hook (about 100 µs per call
    on a CPU core): only for callers that validate shapes and dtypes against the signature themselves.
    """
    program = load_program(path)
    mod = program.module()
    if not check_inputs:
        hooks = mod._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if getattr(hook, "__name__", "") == _INPUT_CHECK_HOOK]:
            del hooks[key]
    if device is not None:
        mod = mod.to(device)
    return mod
