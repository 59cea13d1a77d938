"""`digits`: an MLP classifier over scikit-learn's bundled 8×8 digits (nothing is downloaded)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from workers.models.device import cpu_threads, pick_device

logger = logging.getLogger(__name__)

IN_FEATURES = 64
NUM_CLASSES = 10
PIXEL_MAX = 16.0
DEFAULT_HIDDEN: tuple[int, ...] = (512, 256)


@dataclass
class DigitsTraining:
    """What `train_digits` measured."""

    accuracy: float
    train_seconds: float
    epochs: int


class DigitsMLP(nn.Module):
    """64 raw pixels (0–16) → hidden ReLU layers → 10 logits. The /16 scaling happens inside."""

    arch = "digits_mlp"
    # Set by train_digits.
    training_info: DigitsTraining | None = None

    def __init__(self, hidden: Sequence[int] = DEFAULT_HIDDEN, dropout: float = 0.0) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"hidden": [int(h) for h in hidden], "dropout": float(dropout)}
        layers: list[nn.Module] = []
        width = IN_FEATURES
        for h in self.config["hidden"]:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, NUM_CLASSES))
        # One Sequential keeps state_dict keys predictable ("net.0.weight", ...) for structured pruning.
        self.net = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels * (1.0 / PIXEL_MAX))

    def linears(self) -> list[nn.Linear]:
        """The Linear layers in order (hidden layers first, classifier last)."""
        return [m for m in self.net if isinstance(m, nn.Linear)]


def build_digits_mlp(config: dict[str, Any]) -> DigitsMLP:
    return DigitsMLP(hidden=config.get("hidden", DEFAULT_HIDDEN), dropout=config.get("dropout", 0.0))


def load_digits_split(
    seed: int = 0, eval_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified split of sklearn's digits.

    Returns (x_train, y_train, x_eval, y_eval): x float32 [N, 64] with raw 0–16 values, y int64 [N].
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = np.asarray(data.data, dtype=np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        x, y, test_size=eval_fraction, random_state=seed, stratify=y
    )
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_eval),
        np.ascontiguousarray(y_eval),
    )


@torch.inference_mode()
def predict(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Logits of `model` over x (numpy or tensor), computed on the model's device, as float32 numpy."""
    try:
        model.eval()
    except NotImplementedError:
        pass  # a torch.export module refuses .eval(); it was exported in eval mode already
    params = list(model.parameters()) + list(model.buffers())
    device = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)
    outs = []
    for i in range(0, xt.shape[0], batch_size):
        xb = xt[i : i + batch_size].to(device=device, dtype=dtype)
        outs.append(model(xb).float().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0, NUM_CLASSES), np.float32)


def accuracy(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Top-1 accuracy of `model` (any module mapping [N, 64] pixels to [N, 10] logits) on (x, y)."""
    logits = predict(model, x)
    labels = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    return float((logits.argmax(axis=1) == labels).mean()) if len(labels) else 0.0


def train_digits(
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    epochs: int = 30,
    seed: int = 0,
    *,
    batch_size: int = 64,
    lr: float = 2e-3,
    device: str | torch.device | None = None,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
    threads: int | None = 1,
) -> DigitsMLP:
    """Train a `DigitsMLP` on the training split (deterministic for a seed, on CPU).

    Returns the model in eval mode on CPU; `model.training_info` (DigitsTraining) holds the held-out
    accuracy and the wall time. `threads`: torch CPU threads while training on CPU (default 1, the
    fastest for this size; None leaves the process setting alone).
    """
    dev = torch.device(device) if device is not None else pick_device()
    # Threads only matter on CPU; a GPU run leaves the CPU setting alone.
    with cpu_threads(threads if dev.type == "cpu" else None):
        x_train, y_train, x_eval, y_eval = data if data is not None else load_digits_split(seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsMLP(hidden)
        model.to(dev)
        xt = torch.as_tensor(x_train).to(dev)
        yt = torch.as_tensor(y_train).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch)
        )
        loss_fn = nn.CrossEntropyLoss()
        t0 = time.perf_counter()
        model.train()
        for epoch in range(epochs):
            perm = torch.randperm(len(xt), generator=gen).to(dev)
            total = 0.0
            for i in range(0, len(xt), batch_size):
                idx = perm[i : i + batch_size]
                loss = loss_fn(model(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            if progress is not None and (epoch + 1) % max(1, epochs // 5) == 0:
                progress(f"digits epoch {epoch + 1}/{epochs} loss {total / len(xt):.4f}")
        elapsed = time.perf_counter() - t0
        model.eval().cpu()
        acc = accuracy(model, x_eval, y_eval)
        model.training_info = DigitsTraining(accuracy=acc, train_seconds=elapsed, epochs=epochs)
        logger.info("digits %s trained in %.1f s, held-out accuracy %.4f", list(hidden), elapsed, acc)
        return model
