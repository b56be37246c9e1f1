"""A 4-layer BERT for sequence classification (Hugging Face transformers), from a config.

No download and no weights: the model is built from ``BertConfig`` with random weights.
torch.fx's symbolic tracing cannot follow it (it slices a buffer by a traced length);
fedplan captures it with torch.export. Inputs are keyword arguments, as with any
Hugging Face model, and the model returns a ``ModelOutput`` whose ``logits`` the loss reads.
"""

import torch
import torch.nn.functional as F

DEFAULT_BATCH_SIZE = 8
SEQ_LEN = 64
VOCAB = 1000
LABELS = 4


def build_model() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=512,
                        max_position_embeddings=SEQ_LEN, num_labels=LABELS,
                        use_cache=False)
    return BertForSequenceClassification(config)


def example_batch(batch_size: int):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (batch_size, SEQ_LEN), generator=generator)
    attention_mask = torch.ones(batch_size, SEQ_LEN, dtype=torch.long)
    attention_mask[:, SEQ_LEN - 8:] = 0  # padded tail: the mask is not all ones
    labels = torch.randint(0, LABELS, (batch_size,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs.logits, targets)
