"""A 4-layer Llama with PEFT LoRA adapters (Hugging Face transformers + peft), from a config.

No download and no weights. LoRA freezes the base weights (``requires_grad=False``), so
only the adapters get gradients and optimizer state: fedplan's cost model, simulator and
budget breakdown count exactly those. torch.fx's symbolic tracing stops at the attention
mask construction; fedplan captures the model with torch.export.
"""

import torch
import torch.nn.functional as F

DEFAULT_BATCH_SIZE = 4
SEQ_LEN = 64
VOCAB = 1000


def build_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=SEQ_LEN, use_cache=False)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj"])
    return get_peft_model(base, lora)


def example_batch(batch_size: int):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ_LEN + 1), generator=generator)
    return {"input_ids": tokens[:, :-1]}, tokens[:, 1:]


def loss_fn(outputs, targets):
    logits = outputs.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
