"""`python -m compressor.bench`: the compression figures on `digits`, as a markdown table."""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _row(name: str, target: str, figure: str, accuracy: str, ok: bool) -> str:
    return f"| {name} | {target} | {figure} | {accuracy} | {'yes' if ok else 'NO'} |"


def run_bench(*, threads: int = 1, iters: int = 300, batch: int = 64, seed: int = 0) -> str:
    from compressor import evaluate
    from compressor.methods import CompressionContext, Dataset, count_params, run_pipeline, validate_steps
    from compressor.testing import digits_teacher
    from workers.models import export_module

    torch.set_num_threads(threads)
    teacher, (x_train, y_train, x_eval, y_eval) = digits_teacher(seed=seed)
    train, ev = Dataset(x_train, y_train), Dataset(x_eval, y_eval)
    cpu = torch.device("cpu")

    def compress(steps: list[tuple[str, dict[str, float], dict[str, str]]]) -> tuple[Any, float]:
        specs = validate_steps(steps, device=cpu, has_train_data=True)
        ctx = CompressionContext(
            module=copy.deepcopy(teacher), arch="digits_mlp", config=dict(teacher.config), train=train, eval=ev,
            device=cpu, seed=seed,
        )  # fmt: skip
        t0 = time.perf_counter()
        run_pipeline(ctx, specs)
        return ctx, time.perf_counter() - t0

    def artifact_bytes(module: torch.nn.Module) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            return export_module(module, torch.as_tensor(x_eval[:2]), Path(tmp) / "m.pt2").stat().st_size

    parent = evaluate.measure(teacher, ev, batch=batch, iters=iters)
    parent.size_bytes = artifact_bytes(teacher)
    rows: list[str] = []

    def drop_text(acc: float) -> str:
        return f"{acc:.4f} ({(parent.accuracy - acc) * 100:+.2f} pt drop)"

    for method in ("int8_dynamic", "int8_weight_only", "int8_static"):
        ctx, _ = compress([(method, {}, {})])
        m = evaluate.measure(ctx.module, ev, batch=batch, iters=iters)
        ratio = parent.linear_weight_bytes / m.linear_weight_bytes
        drop = parent.accuracy - m.accuracy
        rows.append(_row(
            f"INT8 `{method}` (torchao)", "Linear weights ≥ 3.5× smaller, drop ≤ 1 pt",
            f"{parent.linear_weight_bytes:,} → {m.linear_weight_bytes:,} B (**{ratio:.2f}×**); "
            f".pt2 {parent.size_bytes:,} → {artifact_bytes(ctx.module):,} B",
            drop_text(m.accuracy), ratio >= 3.5 and drop <= 0.01,
        ))  # fmt: skip

    ctx, secs = compress([("distill", {"epochs": 60}, {"student": "digits_mlp:64"})])
    m = evaluate.measure(ctx.module, ev, batch=batch, iters=iters)
    share = count_params(ctx.module) / parent.params
    rows.append(_row(
        "Distilled student `digits_mlp:64` (T=4, α=0.7, 60 epochs)", "≤ 20% of teacher params, within 2 pt",
        f"{parent.params:,} → {m.params:,} params (**{share:.1%}**), trained in {secs:.1f} s",
        drop_text(m.accuracy), share <= 0.2 and parent.accuracy - m.accuracy <= 0.02,
    ))  # fmt: skip

    ctx, _ = compress([("prune_structured", {"sparsity": 0.5, "epochs": 5}, {})])
    m = evaluate.measure(ctx.module, ev, batch=batch, iters=iters)
    speedup = parent.latency_ms / m.latency_ms
    rows.append(_row(
        "Structured pruning 50% (L2, 5 fine-tune epochs)", f"≥ 1.5× faster at batch {batch} on CPU, within 2 pt",
        f"hidden {teacher.config['hidden']} → {ctx.config['hidden']}; {parent.latency_ms:.3f} → "
        f"{m.latency_ms:.3f} ms (**{speedup:.2f}×**)",
        drop_text(m.accuracy), speedup >= 1.5 and parent.accuracy - m.accuracy <= 0.02,
    ))  # fmt: skip

    header = [
        f"Compression on `digits` (teacher MLP 64-512-256-10, held-out accuracy {parent.accuracy:.4f}, "
        f"{parent.params:,} params). CPU, {threads} torch thread(s), latency = median of 5 × {iters} forward "
        f"passes at batch {batch}. Command: `python -m compressor.bench`.",
        "",
        "| result | target | figure | held-out accuracy | meets target |",
        "| --- | --- | --- | --- | --- |",
    ]
    return "\n".join(header + rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compressor.bench", description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--iters", type=int, default=300, help="forward passes per latency repeat")
    parser.add_argument("--batch", type=int, default=64, help="latency batch size")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    table = run_bench(threads=args.threads, iters=args.iters, batch=args.batch)
    print(table)
    if args.out is not None:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
