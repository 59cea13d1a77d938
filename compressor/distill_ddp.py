"""Distillation entry point for torchrun: `torchrun --nproc_per_node N -m compressor.distill_ddp ...`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from workers.models.export import load_program


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compressor.distill_ddp", description=__doc__)
    parser.add_argument("--teacher", type=Path, required=True, help="teacher as a torch.export .pt2 file")
    parser.add_argument("--train", type=Path, required=True, help=".npz with arrays x and y")
    parser.add_argument("--student", required=True, help='student architecture, e.g. "digits_mlp:32"')
    parser.add_argument("--out", type=Path, required=True, help="student written here (module_state dict)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from compressor.methods.base import Dataset
    from compressor.methods.distill import build_student, train_student

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world > 1:
        # nccl between GPUs, gloo between CPU processes.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(device)
    rank = dist.get_rank() if world > 1 else 0
    try:
        teacher = load_program(args.teacher).module()
        with np.load(args.train, allow_pickle=False) as data:
            train = Dataset(x=np.asarray(data["x"], np.float32), y=np.asarray(data["y"], np.int64))
        torch.manual_seed(args.seed)
        arch, config, student = build_student(args.student, "student")

        def progress(fraction: float, stage: str) -> None:
            if rank == 0:
                print(json.dumps({"progress": fraction, "stage": f"{stage} ({world} proc)"}), flush=True)

        train_student(
            teacher,
            student,
            train,
            temperature=args.temperature,
            alpha=args.alpha,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            device=device,
            seed=args.seed,
            progress=progress,
        )
        if rank == 0:
            tmp = args.out.with_suffix(".tmp")
            torch.save(
                {"arch": arch, "config": config, "state_dict": student.state_dict(), "quantize": None}, tmp
            )
            tmp.replace(args.out)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
