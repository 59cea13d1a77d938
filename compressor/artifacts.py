"""Reading parents and datasets from the model store, writing results as worker-loadable artifacts."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.methods.base import Dataset
from mesh.errors import FailedPrecondition, InvalidArgument
from mesh.store import ArtifactStore
from mesh_pb import common_pb2
from workers.models.export import load_program

logger = logging.getLogger(__name__)

LOADABLE_FORMATS = ("torch_export", "module_state")


@dataclass
class LoadedModel:
    """A parent version rebuilt as an nn.Module."""

    module: nn.Module
    arch: str | None
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def arch_of(mv: common_pb2.ModelVersion) -> tuple[str | None, dict[str, Any]]:
    """(arch, config) from the version's labels `arch` / `arch_config` (JSON), when present."""
    arch = mv.labels.get("arch") or None
    raw = mv.labels.get("arch_config", "")
    try:
        config = json.loads(raw) if raw else {}
    except ValueError:
        config = {}
    return arch, config if isinstance(config, dict) else {}


def load_parent(store: ArtifactStore, mv: common_pb2.ModelVersion) -> LoadedModel:
    """The version's module on CPU, eval mode. A torch_export program whose labels name an arch is rebuilt
    as that arch (so structured pruning sees real Linear layers); else its graph module is used as is."""
    from workers.models import build

    if mv.format not in LOADABLE_FORMATS:
        raise InvalidArgument(
            f"source.version: format {mv.format!r} cannot be compressed (supported: {', '.join(LOADABLE_FORMATS)})"
        )
    path = store.verify(mv.artifact_uri, mv.sha256)
    if mv.format == "module_state":
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or not {"arch", "config", "state_dict"} <= blob.keys():
            raise FailedPrecondition("source.version: module_state artifact lacks arch, config or state_dict")
        if blob.get("quantize"):
            raise FailedPrecondition(f"source.version: artifact is already quantized ({blob['quantize']})")
        module = build(str(blob["arch"]), dict(blob["config"]))
        module.load_state_dict(blob["state_dict"])
        return LoadedModel(module.eval(), str(blob["arch"]), dict(blob["config"]), path)
    graph = load_program(path).module()
    arch, config = arch_of(mv)
    if arch:
        try:
            module = build(arch, config)
            module.load_state_dict(graph.state_dict())
            return LoadedModel(module.eval(), arch, config, path)
        except (ValueError, RuntimeError, KeyError) as exc:
            logger.warning(
                "labels name arch %s but the program does not match it (%s); using the graph", arch, exc
            )
    return LoadedModel(graph, None, {}, path)


def load_dataset(store: ArtifactStore, mv: common_pb2.ModelVersion, kind: str) -> Dataset | None:
    """The `eval_data` or `train_data` arrays named in the version's labels (sha256-verified), or None."""
    uri = mv.labels.get(f"{kind}_uri", "")
    if not uri:
        return None
    path = store.verify(uri, mv.labels.get(f"{kind}_sha256", ""))
    with np.load(path, allow_pickle=False) as data:
        if "x" not in data or "y" not in data:
            raise FailedPrecondition(f"labels.{kind}_uri: {uri} must hold arrays x and y")
        return Dataset(x=np.asarray(data["x"], dtype=np.float32), y=np.asarray(data["y"], dtype=np.int64))


def example_input(signature: common_pb2.Signature, data: Dataset | None) -> torch.Tensor:
    """Two rows of the first input (from the data when there is some), for torch.export."""
    if data is not None and len(data) >= 2:
        return torch.as_tensor(data.x[:2], dtype=torch.float32)
    shape = [2 if d < 0 else int(d) for d in signature.inputs[0].shape]
    return torch.zeros(shape)


def save_result(
    module: nn.Module,
    example: torch.Tensor,
    out_dir: Path,
    *,
    arch: str | None,
    config: dict[str, Any],
    quantize: str | None,
    fp32_state: dict[str, torch.Tensor] | None,
) -> tuple[Path, str]:
    """Writes the result; returns (path, format). torch_export first (a quantized torchao module exports and
    loads back with torch.export.load); a `module_state` file with "quantize" naming the torchao recipe when
    export fails and the recipe can be re-applied by the worker at load."""
    from compressor.methods.quantize import REAPPLICABLE
    from workers.models import export_module

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        path = export_module(module, example, out_dir / "model.pt2")
        return path, "torch_export"
    except Exception as exc:
        if arch is None or (quantize is not None and (quantize not in REAPPLICABLE or fp32_state is None)):
            raise FailedPrecondition(
                f"export: the result cannot be exported with torch.export: {exc}"
            ) from exc
        logger.warning("torch.export failed (%s); writing a module_state artifact instead", exc)
    state = fp32_state if quantize is not None and fp32_state is not None else module.state_dict()
    path = out_dir / "model.pt"
    torch.save(
        {
            "arch": arch,
            "config": copy.deepcopy(config),
            "state_dict": {k: v.detach().cpu() for k, v in state.items()},
            "quantize": quantize,
        },
        path,
    )
    return path, "module_state"
