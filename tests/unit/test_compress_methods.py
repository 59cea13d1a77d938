"""Compression methods on the digits teacher, checked against the held-out split (no network)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor import evaluate
from compressor.methods import CompressionContext, Dataset, count_params, run_pipeline, validate_steps
from compressor.methods.distill import check_student_fits, distill_loss, parse_student
from compressor.testing import digits_teacher
from mesh.errors import InvalidArgument
from workers.models import DigitsMLP, build, export_module

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Several torch threads on a shared, busy host cost far more than they give.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher() -> tuple[DigitsMLP, Dataset, Dataset]:
    model, (x_train, y_train, x_eval, y_eval) = digits_teacher()
    return model, Dataset(x_train, y_train), Dataset(x_eval, y_eval)


def run(teacher: tuple[DigitsMLP, Dataset, Dataset], steps: list) -> CompressionContext:  # type: ignore[type-arg]
    model, train, ev = teacher
    specs = validate_steps(steps, device=CPU, has_train_data=True)
    ctx = CompressionContext(
        module=copy.deepcopy(model), arch="digits_mlp", config=dict(model.config), train=train, eval=ev
    )
    return run_pipeline(ctx, specs)


def reference_accuracy(module: nn.Module, data: Dataset) -> float:
    with torch.no_grad():
        logits = module(torch.as_tensor(data.x))
    return float((logits.float().argmax(1).numpy() == data.y).mean())


def test_teacher_is_good(teacher: tuple[DigitsMLP, Dataset, Dataset]) -> None:
    model, _, ev = teacher
    assert reference_accuracy(model, ev) >= 0.95


def test_unstructured_pruning_is_permanent(teacher: tuple[DigitsMLP, Dataset, Dataset]) -> None:
    ctx = run(teacher, [("prune_unstructured", {"sparsity": 0.6}, {})])
    linears = [m for m in ctx.module.modules() if isinstance(m, nn.Linear)]
    # prune.remove leaves plain weights (no masks, no forward hooks) with 60% zeros overall.
    assert all(not hasattr(m, "weight_mask") and not m._forward_pre_hooks for m in linears)
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    assert zeros / total == pytest.approx(0.6, abs=0.01)
    acc = reference_accuracy(ctx.module, teacher[2])
    assert acc == pytest.approx(evaluate.accuracy(ctx.module, teacher[2]))
    assert acc >= reference_accuracy(teacher[0], teacher[2]) - 0.02


def test_structured_pruning_removes_neurons(teacher: tuple[DigitsMLP, Dataset, Dataset]) -> None:
    ctx = run(teacher, [("prune_structured", {"sparsity": 0.5, "epochs": 3}, {})])
    assert isinstance(ctx.module, DigitsMLP)
    assert ctx.config["hidden"] == [256, 128]
    assert [m.out_features for m in ctx.module.linears()] == [256, 128, 10]
    assert count_params(ctx.module) < count_params(teacher[0]) / 3
    # The result rebuilds from its config like any digits_mlp.
    rebuilt = build("digits_mlp", ctx.config)
    rebuilt.load_state_dict(ctx.module.state_dict())
    assert reference_accuracy(rebuilt, teacher[2]) >= reference_accuracy(teacher[0], teacher[2]) - 0.02


def test_structured_pruning_keeps_the_strongest_neurons() -> None:
    from compressor.methods.prune import shrink_linear_chain

    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 2)
    mlp = nn.Sequential(first, nn.ReLU(), second)
    scale = torch.tensor([1.0, 5.0, 0.1, 3.0])
    with torch.no_grad():
        first.weight.copy_(torch.diag(scale))
        first.bias.zero_()
    x = torch.randn(8, 4)
    keep_w2 = second.weight[:, [1, 3]].detach().clone()
    bias2 = second.bias.detach().clone()
    hidden = shrink_linear_chain(mlp, 0.5, 2)
    # Neurons 1 and 3 (norms 5 and 3) stay; the next layer keeps only their input columns.
    assert hidden == [2]
    new_second = mlp[2]
    assert isinstance(new_second, nn.Linear) and torch.equal(new_second.weight, keep_w2)
    expected = torch.relu(x * scale)[:, [1, 3]] @ keep_w2.T + bias2
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("method", ["int8_dynamic", "int8_weight_only", "int8_static"])
def test_int8_quantization(teacher: tuple[DigitsMLP, Dataset, Dataset], method: str, tmp_path: Path) -> None:
    model, _, ev = teacher
    ctx = run(teacher, [(method, {}, {})])
    assert ctx.quantize == method
    parent_bytes = evaluate.linear_weight_bytes(model)
    assert parent_bytes / evaluate.linear_weight_bytes(ctx.module) >= 3.5
    acc = reference_accuracy(ctx.module, ev)
    assert acc >= reference_accuracy(model, ev) - 0.01
    # The quantized module exports, and the program loaded back gives the module's logits.
    path = export_module(ctx.module, torch.as_tensor(ev.x[:2]), tmp_path / "q.pt2")
    program = torch.export.load(str(path)).module()
    x = torch.as_tensor(ev.x[:64])
    with torch.no_grad():
        torch.testing.assert_close(program(x), ctx.module(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("method", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_casts_keep_an_fp32_signature(
    teacher: tuple[DigitsMLP, Dataset, Dataset], method: str, dtype: torch.dtype
) -> None:
    model, _, ev = teacher
    ctx = run(teacher, [(method, {}, {})])
    assert ctx.dtype == method
    assert all(p.dtype == dtype for p in ctx.module.parameters())
    x = torch.as_tensor(ev.x[:32])
    out = ctx.module(x)
    assert out.dtype == torch.float32
    reference = model.to(dtype)(x.to(dtype)).float()
    model.float()
    torch.testing.assert_close(out, reference)
    assert reference_accuracy(ctx.module, ev) >= reference_accuracy(model, ev) - 0.01


def test_distilled_student_is_small_and_close(teacher: tuple[DigitsMLP, Dataset, Dataset]) -> None:
    model, _, ev = teacher
    ctx = run(teacher, [("distill", {"epochs": 60}, {"student": "digits_mlp:64"})])
    assert isinstance(ctx.module, DigitsMLP)
    assert ctx.config["hidden"] == [64]
    assert count_params(ctx.module) <= 0.2 * count_params(model)
    assert reference_accuracy(ctx.module, ev) >= reference_accuracy(model, ev) - 0.02


def test_methods_compose_in_order(teacher: tuple[DigitsMLP, Dataset, Dataset]) -> None:
    ctx = run(
        teacher,
        [
            ("distill", {"epochs": 40}, {"student": "digits_mlp:128"}),
            ("prune_structured", {"sparsity": 0.5, "epochs": 3}, {}),
            ("int8_dynamic", {}, {}),
        ],
    )
    assert ctx.methods == ["distill", "prune_structured", "int8_dynamic"]
    assert ctx.config["hidden"] == [64]
    assert reference_accuracy(ctx.module, teacher[2]) >= reference_accuracy(teacher[0], teacher[2]) - 0.03


def test_distill_loss_matches_its_formula() -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    temp, alpha = 3.0, 0.6
    p_t = torch.softmax(t / temp, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / temp, 1))).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(5), y].mean()
    torch.testing.assert_close(
        distill_loss(s, t, y, temp, alpha), alpha * temp * temp * kl + (1 - alpha) * ce
    )


@pytest.mark.parametrize(
    ("steps", "field"),
    [
        ([], "steps"),
        ([("shrink", {}, {})], "steps[0].method"),
        ([("prune_unstructured", {"sparsity": 1.5}, {})], "steps[0].params.sparsity"),
        ([("prune_unstructured", {"sparsity": float("nan")}, {})], "steps[0].params.sparsity"),
        ([("prune_structured", {"norm": 3}, {})], "steps[0].params.norm"),
        ([("int8_dynamic", {}, {}), ("prune_structured", {}, {})], "steps[1].method"),
        ([("int8_dynamic", {"bits": 4}, {})], "steps[0].params.bits"),
        ([("distill", {}, {})], "steps[0].options.student"),
        ([("distill", {}, {"student": "digits_mlp:abc"})], "steps[0].options.student"),
        ([("distill", {}, {"student": "resnet:18"})], "steps[0].options.student"),
        ([("distill", {"epochs": 2.5}, {"student": "digits_mlp:8"})], "steps[0].params.epochs"),
        ([("int8_dynamic", {}, {}), ("float8_weight_only", {}, {})], "steps[1].method"),
        ([("float8_weight_only", {}, {})], "steps[0].method"),
        ([("int4_weight_only", {}, {})], "steps[0].method"),
        ([("sparse_2_4", {}, {})], "steps[0].method"),
    ],
)
def test_bad_steps_name_their_field(steps: list, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidArgument) as err:
        validate_steps(steps, device=CPU, has_train_data=True)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_methods_that_need_training_data_say_so() -> None:
    with pytest.raises(InvalidArgument, match=r"^steps\[0\]\.method: .*train_data_uri"):
        validate_steps([("int8_static", {}, {})], device=CPU, has_train_data=False)


def test_student_must_fit_the_signature() -> None:
    arch, config = parse_student("digits_mlp:16-8", "student")
    student = build(arch, config)
    check_student_fits(student, [-1, 64], [-1, 10], "steps[0].options.student")
    with pytest.raises(InvalidArgument, match=r"^steps\[0\]\.options\.student: student outputs shape"):
        check_student_fits(student, [-1, 64], [-1, 5], "steps[0].options.student")
    with pytest.raises(InvalidArgument, match=r"^steps\[0\]\.options\.student: student does not accept"):
        check_student_fits(student, [-1, 32], [-1, 10], "steps[0].options.student")


def test_evaluation_report_and_gate(teacher: tuple[DigitsMLP, Dataset, Dataset]) -> None:
    model, _, ev = teacher
    ctx = run(teacher, [("prune_unstructured", {"sparsity": 0.97}, {})])
    parent = evaluate.measure(model, ev, batch=16, iters=5)
    result = evaluate.measure(ctx.module, ev, batch=16, iters=5)
    assert parent.accuracy == pytest.approx(reference_accuracy(model, ev))
    rep = evaluate.report(parent, result, batch=16, device="cpu")
    assert rep.parent_params == rep.params == count_params(model)
    passed, reason = evaluate.gate(rep, 0.001)
    assert not passed and "points below" in reason
    assert evaluate.gate(rep, 1.0)[0]


@pytest.mark.slow
def test_distill_ddp_two_processes_on_cpu(
    teacher: tuple[DigitsMLP, Dataset, Dataset], tmp_path: Path
) -> None:
    model, train, ev = teacher
    export_module(model, torch.as_tensor(ev.x[:2]), tmp_path / "teacher.pt2")
    np.savez(tmp_path / "train.npz", x=train.x, y=train.y)
    out = tmp_path / "student.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "compressor.distill_ddp", "--teacher", str(tmp_path / "teacher.pt2"),
        "--train", str(tmp_path / "train.npz"), "--student", "digits_mlp:64", "--out", str(out),
        "--epochs", "40", "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env=env, cwd=Path(__file__).parents[2]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"stage": "distill epoch 40/40' in proc.stdout and "(2 proc)" in proc.stdout
    saved = torch.load(out, weights_only=True)
    student = build(saved["arch"], saved["config"])
    student.load_state_dict(saved["state_dict"])
    assert reference_accuracy(student, ev) >= reference_accuracy(model, ev) - 0.03
