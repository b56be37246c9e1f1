"""ViT-tiny for CIFAR-size images: patch size 4 (64 patches + class token), dim 192, depth 6.

Input: (B, 3, 32, 32) float images; output: logits over 10 classes.
3 heads, MLP ratio 4, learned position embedding, dropout 0.1, pre-LayerNorm blocks, SDPA.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_BATCH_SIZE = 8

IMG, PATCH, DIM, DEPTH, HEADS, MLP_RATIO, DROPOUT, NUM_CLASSES = 32, 4, 192, 6, 3, 4, 0.1, 10
N_TOKENS = (IMG // PATCH) ** 2 + 1


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.drop = nn.Dropout(DROPOUT)

    def forward(self, x):
        q, k, v = self.qkv(x).split(DIM, dim=2)
        q = q.reshape(-1, N_TOKENS, HEADS, DIM // HEADS).transpose(1, 2)
        k = k.reshape(-1, N_TOKENS, HEADS, DIM // HEADS).transpose(1, 2)
        v = v.reshape(-1, N_TOKENS, HEADS, DIM // HEADS).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).reshape(-1, N_TOKENS, DIM)
        return self.drop(self.proj(y))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.attn = Attention()
        self.ln2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(
            nn.Linear(DIM, MLP_RATIO * DIM),
            nn.GELU(),
            nn.Dropout(DROPOUT),
            nn.Linear(MLP_RATIO * DIM, DIM),
            nn.Dropout(DROPOUT),
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.randn(1, N_TOKENS, DIM) * 0.02)
        self.drop = nn.Dropout(DROPOUT)
        self.blocks = nn.Sequential(*[Block() for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, NUM_CLASSES)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 64, DIM)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos_embed)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return ViT()


def example_batch(batch_size: int):
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch_size, 3, IMG, IMG, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return inputs, targets
