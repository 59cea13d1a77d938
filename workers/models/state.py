"""`module_state` artifacts: one torch.save'd dict {arch, config, state_dict, quantize}."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def module_state(module: nn.Module, arch: str | None = None, quantize: str | None = None) -> dict[str, Any]:
    """The artifact dict for `module` (arch and config default to the module's own attributes)."""
    name = arch or getattr(module, "arch", None)
    config = getattr(module, "config", None)
    if not isinstance(name, str) or not isinstance(config, dict):
        raise ValueError("module: needs `arch` and `config` attributes (or pass arch=)")
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return {"arch": name, "config": dict(config), "state_dict": state, "quantize": quantize}


def save_module_state(
    module: nn.Module, path: str | Path, arch: str | None = None, quantize: str | None = None
) -> Path:
    """torch.save the artifact dict of `module` to `path`."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module_state(module, arch, quantize), out)
    return out


def load_module_state(
    path: str | Path, device: str | torch.device | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the module of a `module_state` artifact (weights_only load; verify sha256 first).

    Returns (module in eval mode, the artifact dict without its state_dict). The named `quantize`
    is NOT applied here: the caller applies its torchao recipe to the returned fp32 module.
    """
    from workers.models import build

    blob = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not {"arch", "config", "state_dict"} <= blob.keys():
        raise ValueError(f"{path}: not a module_state artifact (needs arch, config, state_dict)")
    module = build(blob["arch"], blob["config"])
    module.load_state_dict(blob["state_dict"])
    module.eval()
    if device is not None:
        module.to(device)
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return module, meta
