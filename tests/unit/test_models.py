"""Demo model architectures: shapes, export round trips, module_state artifacts, digits accuracy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.models import (
    ARCHS,
    DigitsMLP,
    TextEncoder,
    TinyLM,
    accuracy,
    build,
    export_module,
    load_digits_split,
    load_exported,
    load_module_state,
    save_module_state,
    train_digits,
    train_tinylm,
)
from workers.models.device import cpu_threads
from workers.models.encoder import example_input_ids
from workers.models.tinylm import MAX_GENERATE_TOKENS, VOCAB

DigitsData = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="session")
def digits_data() -> DigitsData:
    return load_digits_split(0)


@pytest.fixture(scope="session")
def trained_digits(digits_data: DigitsData) -> DigitsMLP:
    return train_digits(epochs=30, seed=0, data=digits_data, device="cpu")


@pytest.fixture(scope="session")
def short_tinylm() -> Iterator[TinyLM]:
    yield train_tinylm(steps=20, seed=0, config={"d_model": 64, "n_layers": 1}, device="cpu")


def test_archs_registry() -> None:
    assert set(ARCHS) >= {"digits_mlp", "tinylm", "encoder"}
    with pytest.raises(ValueError, match="arch"):
        build("nope", {})


def test_digits_split_is_deterministic_and_held_out(digits_data: DigitsData) -> None:
    x_train, y_train, x_eval, y_eval = digits_data
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_train.shape[1] == 64 and len(x_train) + len(x_eval) == 1797
    assert 0 <= x_train.min() and x_train.max() <= 16
    again = load_digits_split(0)
    np.testing.assert_array_equal(again[2], x_eval)
    np.testing.assert_array_equal(again[3], y_eval)
    assert set(np.unique(y_eval)) == set(range(10))
    # Held out: no eval row also appears in the training split with a different index set.
    train_rows = {row.tobytes() for row in x_train}
    assert sum(row.tobytes() in train_rows for row in x_eval) < len(x_eval) // 20


@pytest.mark.parametrize("hidden", [[512, 256], [32], [48, 24, 12]])
def test_digits_mlp_shapes_and_scaling(hidden: list[int]) -> None:
    model = build("digits_mlp", {"hidden": hidden}).eval()
    assert isinstance(model, DigitsMLP)
    assert [lin.out_features for lin in model.linears()] == [*hidden, 10]
    x = torch.randint(0, 17, (5, 64)).float()
    with torch.no_grad():
        out = model(x)
        ref = model.net(x / 16.0)
    assert out.shape == (5, 10)
    torch.testing.assert_close(out, ref)


def test_encoder_shapes() -> None:
    model = build("encoder", {"size": "tiny"}).eval()
    assert isinstance(model, TextEncoder)
    ids = example_input_ids(3, 128, vocab_size=model.vocab_size)
    with torch.no_grad():
        out = model(ids)
        # Ids beyond the vocabulary are clamped, not an error.
        clamped = model(torch.full((1, 128), 10**9, dtype=torch.long))
    assert out.shape == (3, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and clamped.shape == (1, 64)
    small = build("encoder", {"size": "small"})
    base = build("encoder", {"size": "base", "layers": 1})
    assert isinstance(small, TextEncoder) and isinstance(base, TextEncoder)
    base_cfg = base.config
    assert small.config["hidden"] == 256 and small.config["layers"] in (2, 3, 4)
    assert base_cfg["hidden"] == 768 and base_cfg["heads"] == 12 and base_cfg["layers"] == 1
    with pytest.raises(ValueError, match="encoder size"):
        build("encoder", {"size": "huge"})


def test_tinylm_forward_and_generate(short_tinylm: TinyLM) -> None:
    ids = torch.randint(0, len(VOCAB), (2, 17))
    with torch.no_grad():
        assert short_tinylm(ids).shape == (2, 17, len(VOCAB))
    chunks = list(short_tinylm.generate("The worker ", 30))
    text = "".join(chunks)
    assert len(text) == 30 and len(chunks) == 8
    assert all(0 < len(c) <= 4 for c in chunks)
    assert all(ch.isprintable() or ch == "\n" for ch in text)
    assert text.strip()
    assert "".join(short_tinylm.generate("The worker ", 30)) == text  # seed 0 by default
    assert list(short_tinylm.generate("x", 0)) == []
    # Prompts longer than the context and characters outside the vocabulary are fine.
    assert len("".join(short_tinylm.generate("é" * 300, 5))) == 5
    # A huge max_tokens is capped rather than tying up a worker thread (one CPU thread: 2048 tiny steps).
    with cpu_threads(1):
        assert sum(len(c) for c in short_tinylm.generate("x", 10**9, chunk_chars=256)) == MAX_GENERATE_TOKENS


def test_digits_export_round_trip(trained_digits: DigitsMLP, digits_data: DigitsData, tmp_path: Path) -> None:
    x_eval = torch.as_tensor(digits_data[2])
    path = export_module(trained_digits, x_eval[:1], tmp_path / "digits.pt2")
    loaded = load_exported(path)
    for batch in (1, 7, 64):
        xb = x_eval[:batch]
        with torch.no_grad():
            torch.testing.assert_close(loaded(xb), trained_digits(xb), rtol=1e-5, atol=1e-5)
    unchecked = load_exported(path, check_inputs=False)
    with torch.no_grad():
        torch.testing.assert_close(unchecked(x_eval[:3]), trained_digits(x_eval[:3]), rtol=1e-5, atol=1e-5)
    assert accuracy(loaded, digits_data[2], digits_data[3]) == accuracy(
        trained_digits, digits_data[2], digits_data[3]
    )


def test_encoder_export_round_trip(tmp_path: Path) -> None:
    model = build("encoder", {"size": "tiny"}).eval()
    path = export_module(model, example_input_ids(2, vocab_size=1024), tmp_path / "enc.pt2")
    loaded = load_exported(path)
    ids = example_input_ids(5, vocab_size=1024, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-4, atol=1e-5)
        assert loaded(ids[:1]).shape == (1, 64)


def test_module_state_round_trip(short_tinylm: TinyLM, tmp_path: Path) -> None:
    path = save_module_state(short_tinylm, tmp_path / "tinylm.pt")
    blob = torch.load(path, weights_only=True)
    assert blob["arch"] == "tinylm" and blob["quantize"] is None
    assert blob["config"] == short_tinylm.config
    rebuilt, meta = load_module_state(path)
    assert isinstance(rebuilt, TinyLM) and meta["arch"] == "tinylm"
    ids = torch.randint(0, len(VOCAB), (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), short_tinylm(ids))
    assert list(rebuilt.generate("Hello", 12)) == list(short_tinylm.generate("Hello", 12))


def test_digits_module_state_round_trip(trained_digits: DigitsMLP, tmp_path: Path) -> None:
    path = save_module_state(trained_digits, tmp_path / "d.pt", quantize="int8_dynamic")
    rebuilt, meta = load_module_state(path)
    assert meta["quantize"] == "int8_dynamic" and meta["config"]["hidden"] == [512, 256]
    x = torch.rand(4, 64) * 16
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained_digits(x))


def test_digits_reaches_95_percent(trained_digits: DigitsMLP, digits_data: DigitsData) -> None:
    acc = accuracy(trained_digits, digits_data[2], digits_data[3])
    assert acc >= 0.95
    assert trained_digits.training_info is not None
    assert trained_digits.training_info.accuracy == pytest.approx(acc)
    # accuracy() is a plain top-1 over the logits.
    logits = trained_digits(torch.as_tensor(digits_data[2])).detach().numpy()
    assert acc == pytest.approx(float((logits.argmax(1) == digits_data[3]).mean()))
