"""Model configs the planner knows by name, and loading one from a ``config.json``.

The planner never downloads anything: a name is looked up in :data:`BUILTIN_CONFIGS` (the
published dimensions of a few common models) and anything else must be a path to a
``config.json`` as ``transformers`` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flex_surgery.plan.errors import PlanError

# name -> (config class name in transformers, keyword arguments): the published dimensions.
BUILTIN_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-70b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)),
    "llama-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)),
    "llama-7b": ("LlamaConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "smollm2-135m": ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", dict(
        vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)),
}


def load_config(name_or_path: str | Path):
    """The ``transformers`` config of a built-in name or of a ``config.json`` path."""
    import transformers

    if str(name_or_path) in BUILTIN_CONFIGS:
        cls_name, kwargs = BUILTIN_CONFIGS[str(name_or_path)]
        config = getattr(transformers, cls_name)(**kwargs, use_cache=False)
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"unknown model {str(name_or_path)!r}: give one of "
                            f"{sorted(BUILTIN_CONFIGS)} or the path of a config.json")
        try:
            data = json.loads(path.read_text())
            model_type = data.pop("model_type")
        except (ValueError, KeyError) as exc:
            raise PlanError(f"{path} is not a transformers config.json with a model_type "
                            f"({type(exc).__name__}: {exc})") from exc
        data["use_cache"] = False
        config = transformers.AutoConfig.for_model(model_type, **data)
    config._attn_implementation = "eager"
    return config
