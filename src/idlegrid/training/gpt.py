"""A minimal byte-level GPT whose layers can be cut into pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model."""

    vocab: int = 256
    seq: int = 64
    layers: int = 4
    dim: int = 64
    heads: int = 4


class Embed(nn.Module):
    """Token + learned position embeddings."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.seq, cfg.dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(batch, seq) ids → (batch, seq, dim)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        out: torch.Tensor = self.tok(idx) + self.pos(pos)
        return out


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, dim) → (batch, seq, dim)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class Head(nn.Module):
    """Final norm and the byte logits."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, dim) → (batch, seq, vocab)."""
        out: torch.Tensor = self.out(self.ln(x))
        return out


def build_stages(cfg: GPTConfig, stages: int, seed: int) -> list[nn.Sequential]:
    """The model, initialised from `seed`, cut into `stages` consecutive pieces."""
    if not 1 <= stages <= cfg.layers:
        raise ValueError(f"stages must be in 1..{cfg.layers}, got {stages}")
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        blocks = [Block(cfg) for _ in range(cfg.layers)]
        embed, head = Embed(cfg), Head(cfg)
    per, extra = divmod(cfg.layers, stages)
    out, start = [], 0
    for j in range(stages):
        n = per + (1 if j < extra else 0)
        mods: list[nn.Module] = [embed] if j == 0 else []
        mods.extend(blocks[start : start + n])
        if j == stages - 1:
            mods.append(head)
        out.append(nn.Sequential(*mods))
        start += n
    return out
