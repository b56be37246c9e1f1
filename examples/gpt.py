"""A small GPT-style decoder: vocab 512, context 64, 4 pre-LayerNorm blocks, d_model 128, 4 heads.

Input: (B, 64) long token ids; targets: (B, 64) next-token ids; output: (B, 64, 512) logits.
Learned positional embedding, GELU MLP, dropout 0.1, causal SDPA, lm head tied to `wte`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_BATCH_SIZE = 8

VOCAB, CONTEXT, N_LAYER, D_MODEL, N_HEAD, DROPOUT = 512, 64, 4, 128, 4, 0.1


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.drop = nn.Dropout(DROPOUT)

    def forward(self, x):
        # The context length is fixed, so reshapes use constants rather than traced sizes.
        q, k, v = self.qkv(x).split(D_MODEL, dim=2)
        q = q.reshape(-1, CONTEXT, N_HEAD, D_MODEL // N_HEAD).transpose(1, 2)
        k = k.reshape(-1, CONTEXT, N_HEAD, D_MODEL // N_HEAD).transpose(1, 2)
        v = v.reshape(-1, CONTEXT, N_HEAD, D_MODEL // N_HEAD).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(-1, CONTEXT, D_MODEL)
        return self.drop(self.proj(y))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.attn = CausalSelfAttention()
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.mlp = nn.Sequential(
            nn.Linear(D_MODEL, 4 * D_MODEL),
            nn.GELU(),
            nn.Linear(4 * D_MODEL, D_MODEL),
            nn.Dropout(DROPOUT),
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D_MODEL)
        self.wpe = nn.Embedding(CONTEXT, D_MODEL)
        self.register_buffer("pos", torch.arange(CONTEXT), persistent=False)
        self.drop = nn.Dropout(DROPOUT)
        self.blocks = nn.Sequential(*[Block() for _ in range(N_LAYER)])
        self.ln_f = nn.LayerNorm(D_MODEL)
        # GPT-2 style init: small embeddings keep the tied lm-head logits near zero at start.
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)

    def forward(self, idx):
        x = self.drop(self.wte(idx) + self.wpe(self.pos))
        x = self.ln_f(self.blocks(x))
        return F.linear(x, self.wte.weight)  # weight-tied lm head


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return GPT()


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (batch_size, CONTEXT + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs.reshape(-1, VOCAB), targets.reshape(-1))
