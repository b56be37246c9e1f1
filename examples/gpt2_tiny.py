"""A 4-layer GPT-2 language model (Hugging Face transformers), from a config.

No download and no weights. torch.fx's symbolic tracing stops at the attention-mask
construction (``if (q_length == 1 or kv_length == q_length) ...``); fedplan captures it
with torch.export.
"""

import torch
import torch.nn.functional as F

DEFAULT_BATCH_SIZE = 8
SEQ_LEN = 64
VOCAB = 1000


def build_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=128, n_layer=4,
                        n_head=4, use_cache=False)
    return GPT2LMHeadModel(config)


def example_batch(batch_size: int):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ_LEN + 1), generator=generator)
    return {"input_ids": tokens[:, :-1]}, tokens[:, 1:]


def loss_fn(outputs, targets):
    logits = outputs.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
