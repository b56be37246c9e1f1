"""A nanoGPT-style decoder that builds its causal mask with ``torch.ones(t, t).tril()``.

Written the way research code often is: the mask depends on the sequence length read
from the input, and attention is computed by hand (softmax of masked scores). torch.fx's
symbolic tracing fails on ``torch.ones`` of a traced size; torch.export captures it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_BATCH_SIZE = 8
SEQ_LEN = 64
VOCAB = 512
D_MODEL = 128
N_HEAD = 4
N_LAYER = 4


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2)
        k = k.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2)
        v = v.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2)
        mask = torch.ones(t, t, device=x.device).tril()
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // N_HEAD)
        scores = scores.masked_fill(mask == 0, float("-inf"))
        y = self.drop(F.softmax(scores, dim=-1)) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.attn = CausalSelfAttention()
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(),
                                 nn.Linear(4 * D_MODEL, D_MODEL), nn.Dropout(0.1))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NanoGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D_MODEL)
        self.wpe = nn.Embedding(SEQ_LEN, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return NanoGPT()


def example_batch(batch_size: int):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ_LEN + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
