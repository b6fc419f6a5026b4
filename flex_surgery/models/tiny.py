"""Tiny random-weight ``transformers`` models built from configs: no download, ~10-40 ms each.

They exercise the real module structure of each architecture (attention, MLP, norms, tied
embeddings) at a size where a forward on 2 CPU cores takes milliseconds, which is what tests,
docs examples and the demo's fallback need. Dropout is off so runs are deterministic.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_ARCHITECTURES = ("llama", "gpt2", "opt", "bert", "vit")

_VOCAB = 128


def _config(arch: str, **overrides: Any):
    import transformers as tf

    if arch == "llama":
        kw = dict(vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, use_cache=False)
        cls = tf.LlamaConfig
    elif arch == "gpt2":
        kw = dict(vocab_size=_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                  bos_token_id=0, eos_token_id=0)
        cls = tf.GPT2Config
    elif arch == "opt":
        kw = dict(vocab_size=_VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, use_cache=False)
        cls = tf.OPTConfig
    elif arch == "bert":
        kw = dict(vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cls = tf.BertConfig
    elif arch == "vit":
        kw = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cls = tf.ViTConfig
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHITECTURES}")
    kw.update(overrides)
    config = cls(**kw)
    config._attn_implementation = "eager"
    return config


def tiny_hf_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                  **config_overrides: Any) -> torch.nn.Module:
    """A tiny random-weight model of ``arch`` (one of :data:`TINY_ARCHITECTURES`) in eval mode.

    Language models come with their LM head (``*ForCausalLM`` / ``*LMHeadModel``); BERT and ViT
    are the bare encoders. The same ``seed`` always gives the same weights.
    """
    import transformers as tf

    config = _config(arch, **config_overrides)
    cls = {
        "llama": tf.LlamaForCausalLM,
        "gpt2": tf.GPT2LMHeadModel,
        "opt": tf.OPTForCausalLM,
        "bert": tf.BertModel,
        "vit": tf.ViTModel,
    }[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.to(dtype).eval()


def example_inputs(arch: str, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, Any]:
    """Keyword inputs for :func:`tiny_hf_model` models: token ids, or pixels for ViT."""
    gen = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}
    return {"input_ids": torch.randint(0, _VOCAB, (batch, seq), generator=gen)}
