"""Knowledge distillation: a smaller student trained on the teacher's soft targets (DDP when launched so)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressor.methods.base import CompressionContext, Dataset, Param, eval_mode
from mesh.errors import Cancelled, Internal, InvalidArgument

logger = logging.getLogger(__name__)

DISTILL_PARAMS: dict[str, Param] = {
    "temperature": Param(4.0, 0.0, 100.0, low_inclusive=False, doc="softmax temperature of the soft targets"),
    "alpha": Param(0.7, 0.0, 1.0, doc="weight of the soft-target loss (1 - alpha on the hard labels)"),
    "epochs": Param(60, 1, 10_000, integer=True, doc="training epochs"),
    "lr": Param(3e-3, 0.0, 1.0, low_inclusive=False, doc="AdamW learning rate"),
    "batch_size": Param(64, 1, 65_536, integer=True, doc="rows per step (per process under DDP)"),
    "processes": Param(1, 1, 64, integer=True, doc="> 1 runs `torchrun` with this many DDP processes"),
}
DISTILL_OPTIONS = ("student",)


def parse_student(spec: str, field_name: str) -> tuple[str, dict[str, Any]]:
    """ "digits_mlp:32" or "digits_mlp:128-64" → ("digits_mlp", {"hidden": [128, 64]})."""
    arch, _, rest = spec.strip().partition(":")
    if arch != "digits_mlp":
        raise InvalidArgument(
            f"{field_name}: student architecture {arch!r} is not supported (known: digits_mlp)"
        )
    parts = [p for p in rest.replace(",", "-").split("-") if p.strip()] if rest else []
    try:
        hidden = [int(p) for p in parts]
    except ValueError:
        raise InvalidArgument(
            f"{field_name}: hidden sizes must be integers separated by '-', got {rest!r}"
        ) from None
    if not hidden or any(h < 1 or h > 65_536 for h in hidden):
        raise InvalidArgument(f"{field_name}: give 1 to 65536 units per hidden layer, e.g. digits_mlp:32")
    return arch, {"hidden": hidden}


def build_student(spec: str, field_name: str) -> tuple[str, dict[str, Any], nn.Module]:
    from workers.models import build

    arch, config = parse_student(spec, field_name)
    return arch, config, build(arch, config)


def check_student_fits(
    student: nn.Module, input_shape: list[int], output_shape: list[int], field_name: str
) -> None:
    """Runs the student on zeros of the signature's input shape and compares the output shape."""
    shape_in = [2 if d < 0 else int(d) for d in input_shape]
    shape_out = [2 if d < 0 else int(d) for d in output_shape]
    try:
        with torch.no_grad():
            out = student.eval()(torch.zeros(shape_in))
    except Exception as exc:
        raise InvalidArgument(
            f"{field_name}: student does not accept the input shape {input_shape}: {exc}"
        ) from None
    if list(out.shape) != shape_out:
        raise InvalidArgument(
            f"{field_name}: student outputs shape {list(out.shape)}, the model's signature needs {output_shape}"
        )


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(student, labels) (Hinton et al.)."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * t * t * soft + (1.0 - alpha) * hard


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    eval_mode(teacher)
    return torch.cat([teacher(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def train_student(
    teacher: nn.Module,
    student: nn.Module,
    train: Dataset,
    *,
    temperature: float,
    alpha: float,
    epochs: int,
    lr: float,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    progress: Callable[[float, str], None] = lambda f, s: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> nn.Module:
    """Trains `student` in place. Under an initialised torch.distributed group (world > 1) the student is
    wrapped in DistributedDataParallel and each rank trains on its shard of every epoch's permutation."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    x = torch.as_tensor(train.x, dtype=torch.float32, device=device)
    y = torch.as_tensor(train.y, dtype=torch.long, device=device)
    soft = teacher_logits(teacher.to(device), x)
    torch.manual_seed(seed)
    student.to(device).train()
    model: nn.Module = student
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    per_rank = (len(x) + world - 1) // world
    steps = max(1, epochs * ((per_rank + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    every = max(1, epochs // 20)
    for epoch in range(epochs):
        if should_stop():
            raise Cancelled("job: cancelled")
        # The same permutation on every rank (same generator seed), each rank takes its own shard.
        perm = torch.randperm(len(x), generator=gen)[rank::world].to(device)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss = distill_loss(model(x[idx]), soft[idx], y[idx], temperature, alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < steps:
                sched.step()
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            progress(
                (epoch + 1) / epochs, f"distill epoch {epoch + 1}/{epochs} loss {float(loss.detach()):.4f}"
            )
    student.eval().cpu()
    return student


def distill(ctx: CompressionContext, params: dict[str, float], options: dict[str, str]) -> None:
    """Replaces the context's module by a student distilled from it."""
    train = ctx.require_train("steps")
    spec = options.get("student", "")
    arch, config = parse_student(spec, "steps.options.student")
    kwargs: dict[str, Any] = dict(
        temperature=float(params["temperature"]),
        alpha=float(params["alpha"]),
        epochs=int(params["epochs"]),
        lr=float(params["lr"]),
        batch_size=int(params["batch_size"]),
    )
    processes = int(params["processes"])
    if processes > 1:
        student = _distill_torchrun(ctx, spec, train, processes, kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            student = build_student(spec, "steps.options.student")[2]
        train_student(
            ctx.module,
            student,
            train,
            device=ctx.device,
            seed=ctx.seed,
            progress=ctx.progress,
            should_stop=ctx.should_stop,
            **kwargs,
        )
    ctx.module = student.eval()
    full = getattr(student, "config", None)
    ctx.arch, ctx.config = arch, dict(full) if isinstance(full, dict) else config


def _distill_torchrun(
    ctx: CompressionContext, student_spec: str, train: Dataset, processes: int, kwargs: dict[str, Any]
) -> nn.Module:
    """Runs `python -m compressor.distill_ddp` under torchrun and loads the student it wrote."""
    from workers.models import build

    with tempfile.TemporaryDirectory(prefix="maas-distill-") as tmp:
        teacher_path = Path(tmp) / "teacher.pt2"
        data_path = Path(tmp) / "train.npz"
        out_path = Path(tmp) / "student.pt"
        example = torch.as_tensor(train.x[:2], dtype=torch.float32)
        teacher = ctx.module.cpu().eval()
        program = torch.export.export(
            teacher, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 20)},)
        )
        torch.export.save(program, teacher_path)
        np.savez(data_path, x=train.x, y=train.y)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "compressor.distill_ddp",
            "--teacher",
            str(teacher_path),
            "--train",
            str(data_path),
            "--student",
            student_spec,
            "--out",
            str(out_path),
            "--seed",
            str(ctx.seed),
            "--device",
            ctx.device.type,
        ]
        for key, value in kwargs.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        logger.info("distilling with %d DDP processes", processes)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if ctx.should_stop():
                proc.terminate()
                proc.wait(timeout=30)
                raise Cancelled("job: cancelled")
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                    ctx.progress(float(event["progress"]), str(event["stage"]))
                except (ValueError, KeyError):
                    pass
        rc = proc.wait()
        err = proc.stderr.read() if proc.stderr is not None else ""
        if rc != 0:
            raise Internal(f"distill: torchrun exited with {rc}: {err[-2000:]}")
        saved = torch.load(out_path, weights_only=True)
        student = build(saved["arch"], saved["config"])
        student.load_state_dict(saved["state_dict"])
        return student.eval()
