"""`tinylm`: a small character-level causal transformer trained locally on a built-in corpus."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from workers.models.device import cpu_threads, pick_device

logger = logging.getLogger(__name__)

# Fixed vocabulary: newline + printable ASCII. Fixed so a module_state artifact needs no vocabulary file.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
_UNKNOWN = _INDEX[" "]

# Longest stream one generate() call produces, whatever max_tokens a client asks for.
MAX_GENERATE_TOKENS = 2048

DEFAULT_CONFIG: dict[str, Any] = {"d_model": 128, "n_heads": 4, "n_layers": 2, "context": 64, "ff_mult": 4}

# A few paragraphs of plain English written for this project; the model learns its spelling and rhythm.
CORPUS = """\
The mesh serves models to anyone who asks. A client sends a request to the gateway, the gateway picks \
a worker, and the worker runs the model and sends the answer back. Each step is small, and each step \
is easy to watch.

A model is a set of numbers that turns one thing into another. The digits model looks at a small \
picture of a number and says which number it is. The language model reads a few words and writes \
the next ones, one letter at a time, so the answer can stream back while it is still being written.

Workers keep their models in memory. When a new version arrives, a worker loads it, checks that the \
file is the one that was registered, and warms it up before the first request. When memory runs \
short, the version that has waited longest without a request is the first to leave.

The router watches every worker. It knows which versions are ready, where they live, and how busy \
each worker is. When one worker falls silent, the router stops sending traffic to it, and the \
requests go to the others. Nothing is lost, and the clients do not need to know.

Small requests are gathered into batches. A batch of many requests takes almost the same time as a \
single one, so the worker waits a moment for company and then runs them together. The answers are \
split again and each one goes home to the client that asked for it.

The compressor makes models smaller and faster. It removes the parts that matter least, stores \
numbers with fewer bits, or teaches a small student to copy a large teacher. Then it measures the \
new model on data it has never seen. Only a model that keeps its accuracy is allowed to serve.

Good systems are quiet. They start with one command, they explain what went wrong in plain words, \
and they stop cleanly when asked. The best request is the one that simply works, and the best \
answer is the one that arrives on time.
"""


def encode(text: str) -> list[int]:
    """Characters to token ids; characters outside the vocabulary become spaces."""
    return [_INDEX.get(ch, _UNKNOWN) for ch in text]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


@dataclass
class TinyLMTraining:
    """What `train_tinylm` measured."""

    final_loss: float
    train_seconds: float
    steps: int


class TinyLM(nn.Module):
    """Decoder-only character transformer. forward: ids int64 [B, T] → logits [B, T, vocab]."""

    arch = "tinylm"
    positions: torch.Tensor
    training_info: TinyLMTraining | None = None

    def __init__(
        self, d_model: int = 128, n_heads: int = 4, n_layers: int = 2, context: int = 64, ff_mult: int = 4
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "d_model": int(d_model),
            "n_heads": int(n_heads),
            "n_layers": int(n_layers),
            "context": int(context),
            "ff_mult": int(ff_mult),
        }
        self.context = int(context)
        self.tok = nn.Embedding(len(VOCAB), d_model)
        self.pos = nn.Embedding(context, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            dim_feedforward=ff_mult * d_model,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, len(VOCAB), bias=False)
        self.register_buffer("positions", torch.arange(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos(self.positions[:t])
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device, dtype=h.dtype)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))

    def generate(
        self,
        prompt: str,
        max_tokens: int = 64,
        *,
        temperature: float = 0.7,
        top_k: int = 20,
        seed: int | None = 0,
        chunk_chars: int = 4,
    ) -> Iterator[str]:
        """Stream up to `max_tokens` new characters after `prompt`, in chunks of `chunk_chars`.

        `max_tokens` is capped at MAX_GENERATE_TOKENS; only the last `context` characters of the prompt
        are read.

        Deterministic for a given seed (None = fresh randomness). Safe to iterate from any thread: each
        step sets inference mode itself, so no grad mode is held across a yield.
        """
        max_tokens = min(int(max_tokens), MAX_GENERATE_TOKENS)
        if max_tokens <= 0:
            return
        chunk_chars = max(1, int(chunk_chars))
        device = self.positions.device
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        ids = encode(prompt[-self.context :]) or [_INDEX["\n"]]
        pending: list[int] = []
        for _ in range(max_tokens):
            with torch.inference_mode():
                window = torch.tensor([ids[-self.context :]], dtype=torch.long, device=device)
                logits = self(window)[0, -1].float()
                if temperature <= 0:
                    nxt = int(logits.argmax())
                else:
                    logits = logits / temperature
                    if 0 < top_k < logits.numel():
                        kth = torch.topk(logits, top_k).values[-1]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    nxt = int(torch.multinomial(probs, 1, generator=gen))
            ids.append(nxt)
            pending.append(nxt)
            if len(pending) >= chunk_chars:
                yield decode(pending)
                pending = []
        if pending:
            yield decode(pending)


def build_tinylm(config: dict[str, Any]) -> TinyLM:
    cfg = {**DEFAULT_CONFIG, **config}
    return TinyLM(cfg["d_model"], cfg["n_heads"], cfg["n_layers"], cfg["context"], cfg["ff_mult"])


def train_tinylm(
    steps: int = 300,
    seed: int = 0,
    *,
    config: dict[str, Any] | None = None,
    batch_size: int = 16,
    seq_len: int = 64,
    lr: float = 5e-3,
    corpus: str = CORPUS,
    device: str | torch.device | None = None,
    progress: Callable[[str], None] | None = None,
    threads: int | None = 1,
) -> TinyLM:
    """Train a TinyLM on `corpus` (deterministic for a seed). Returns it in eval mode on CPU.

    `threads`: torch CPU threads while training on CPU (default 1; None leaves the process setting).
    """
    dev = torch.device(device) if device is not None else pick_device()
    # Threads only matter on CPU; a GPU run leaves the CPU setting alone.
    with cpu_threads(threads if dev.type == "cpu" else None):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_tinylm(config or {})
        seq_len = min(seq_len, model.context)
        model.to(dev).train()
        data = torch.tensor(encode(corpus), dtype=torch.long, device=dev)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
        offsets = torch.arange(seq_len + 1, device=dev)
        t0 = time.perf_counter()
        loss_value = float("nan")
        for step in range(steps):
            starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen).to(dev)
            chunk = data[starts[:, None] + offsets]
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_value = float(loss.detach())
            if progress is not None and (step + 1) % max(1, steps // 5) == 0:
                progress(f"tinylm step {step + 1}/{steps} loss {loss_value:.3f}")
        elapsed = time.perf_counter() - t0
        model.eval().cpu()
        model.training_info = TinyLMTraining(final_loss=loss_value, train_seconds=elapsed, steps=steps)
        logger.info("tinylm trained %d steps in %.1f s, loss %.3f", steps, elapsed, loss_value)
        return model
