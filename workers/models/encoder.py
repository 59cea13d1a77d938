"""`encoder`: a BERT-shaped text encoder with random weights (throughput demo, nothing downloaded)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SEQ_LEN = 128
BERT_VOCAB = 30522

# `small` fits a CPU; `base` is BERT-base's shape (12 layers × 768, 12 heads) for GPU throughput;
# `tiny` keeps tests fast.
ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 1024,
        "hidden": 64,
        "layers": 2,
        "heads": 2,
        "intermediate": 128,
        "max_len": SEQ_LEN,
    },
    "small": {
        "vocab_size": BERT_VOCAB,
        "hidden": 256,
        "layers": 4,
        "heads": 4,
        "intermediate": 1024,
        "max_len": SEQ_LEN,
    },
    "base": {
        "vocab_size": BERT_VOCAB,
        "hidden": 768,
        "layers": 12,
        "heads": 12,
        "intermediate": 3072,
        "max_len": SEQ_LEN,
    },
}


class TextEncoder(nn.Module):
    """input_ids int64 [B, T<=max_len] → pooled embedding [B, hidden] (tanh(W·h[CLS]) as in BERT).

    Ids outside the vocabulary are clamped rather than failing, so any int64 input is servable.
    """

    arch = "encoder"
    positions: torch.Tensor

    def __init__(
        self,
        vocab_size: int = BERT_VOCAB,
        hidden: int = 256,
        layers: int = 4,
        heads: int = 4,
        intermediate: int = 1024,
        max_len: int = SEQ_LEN,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "vocab_size": int(vocab_size),
            "hidden": int(hidden),
            "layers": int(layers),
            "heads": int(heads),
            "intermediate": int(intermediate),
            "max_len": int(max_len),
        }
        self.vocab_size = int(vocab_size)
        self.tok = nn.Embedding(vocab_size, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        layer = nn.TransformerEncoderLayer(
            hidden,
            heads,
            dim_feedforward=intermediate,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=False,
            layer_norm_eps=1e-12,
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pooler = nn.Linear(hidden, hidden)
        # A buffer (not torch.arange in forward) so an exported graph carries no device constant.
        self.register_buffer("positions", torch.arange(max_len), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initialiser: N(0, 0.02) keeps activations in range for 12 layers of random weights.
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.clamp(0, self.vocab_size - 1)
        h = self.tok(ids) + self.pos(self.positions[: ids.shape[1]])
        h = self.layers(self.emb_norm(h))
        return torch.tanh(self.pooler(h[:, 0]))


def encoder_config(size: str) -> dict[str, Any]:
    """The named preset (`tiny`, `small`, `base`)."""
    try:
        return dict(ENCODER_CONFIGS[size])
    except KeyError:
        raise ValueError(f"encoder size {size!r}: expected one of {sorted(ENCODER_CONFIGS)}") from None


def build_encoder(config: dict[str, Any]) -> TextEncoder:
    """Build from a preset name (`{"size": "small"}`), explicit fields, or both (fields win)."""
    cfg = encoder_config(str(config.get("size", "small")))
    cfg.update({k: v for k, v in config.items() if k != "size"})
    return TextEncoder(**cfg)


def example_input_ids(
    batch: int = 2, seq_len: int = SEQ_LEN, vocab_size: int = BERT_VOCAB, seed: int = 0
) -> torch.Tensor:
    """Deterministic random token ids int64 [batch, seq_len]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen, dtype=torch.long)
