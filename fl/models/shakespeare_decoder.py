"""A small transformer decoder for next-character prediction on Shakespeare (the default
model of ``--dataset shakespeare``): character and position embeddings, three pre-norm
decoder layers (causal self-attention with 4 heads, a 4x MLP), a final LayerNorm and a
linear head over the 96-character vocabulary, predicting the next character at every
position of a 32-character window.

Input: (B, 32) int64 character ids; output: (B, 32, 96) logits; targets (B, 32).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_BATCH_SIZE = 16
VOCAB = 96
CONTEXT = 32
HEADS = 4


def _w(channels: int, width: float) -> int:
    return max(HEADS, int(round(channels * width / HEADS)) * HEADS)


class Embed(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d)
        self.positions = nn.Embedding(CONTEXT, d)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.tokens(idx) + self.positions(pos)


class DecoderLayer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)   # separate, not fused: HeteroFL's nested sub-models
        self.k = nn.Linear(d, d)   # take leading rows of each
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        q = q.view(b, t, HEADS, d // HEADS).transpose(1, 2)
        k = k.view(b, t, HEADS, d // HEADS).transpose(1, 2)
        v = v.view(b, t, HEADS, d // HEADS).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Head(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, VOCAB)

    def forward(self, x):
        return self.out(self.norm(x))


def build_model(width: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    d = _w(64, width)
    return nn.Sequential(
        nn.Sequential(Embed(d), DecoderLayer(d)),
        nn.Sequential(DecoderLayer(d)),
        nn.Sequential(DecoderLayer(d), Head(d)))


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (batch_size, CONTEXT), generator=g),
            torch.randint(0, VOCAB, (batch_size, CONTEXT), generator=g))


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
