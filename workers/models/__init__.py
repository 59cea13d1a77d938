"""Demo model architectures (`digits_mlp`, `tinylm`, `encoder`) and the registry that rebuilds them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from workers.models.device import pick_device
from workers.models.digits import DigitsMLP, accuracy, build_digits_mlp, load_digits_split, train_digits
from workers.models.encoder import ENCODER_CONFIGS, TextEncoder, build_encoder, encoder_config
from workers.models.export import export_module, load_exported
from workers.models.state import load_module_state, module_state, save_module_state
from workers.models.tinylm import TinyLM, build_tinylm, train_tinylm

# arch name -> builder(config). module_state artifacts name one of these in their "arch" field.
ARCHS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "digits_mlp": build_digits_mlp,
    "tinylm": build_tinylm,
    "encoder": build_encoder,
}


def build(arch: str, config: dict[str, Any]) -> nn.Module:
    """A freshly initialised module of `arch` with `config` (weights are loaded by the caller)."""
    try:
        builder = ARCHS[arch]
    except KeyError:
        raise ValueError(f"arch {arch!r}: expected one of {sorted(ARCHS)}") from None
    return builder(dict(config))


__all__ = [
    "ARCHS",
    "ENCODER_CONFIGS",
    "DigitsMLP",
    "TextEncoder",
    "TinyLM",
    "accuracy",
    "build",
    "encoder_config",
    "export_module",
    "load_digits_split",
    "load_exported",
    "load_module_state",
    "module_state",
    "pick_device",
    "save_module_state",
    "train_digits",
    "train_tinylm",
]
