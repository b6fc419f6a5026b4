"""Root conftest.py for running tuned-lens 0.2.0's own model-surgery tests against flex_surgery.

``_test/test_tuned_lens_compat.py`` copies this file as the root ``conftest.py`` of a directory
holding tuned-lens's ``tests/`` (its own conftest included), unchanged. Those tests build random
models from the configs of checkpoints on the Hugging Face Hub (``AutoConfig.from_pretrained``)
and import ``datasets``. This file stands in for both, without editing a test:

- ``AutoConfig.from_pretrained`` gives a small config of the checkpoint's architecture (GPT-NeoX
  for Pythia, Bloom, GPT-Neo, OPT, GPT-2; 3 blocks, hidden size 16), so the models built from
  it have the real module classes and names;
- ``datasets`` is a module with a ``Dataset`` class (the tests of model surgery use none).

With ``TUNED_LENS_COMPAT_TARGET=tuned_lens`` the same tests run against tuned-lens 0.2.0's own
``model_surgery.py``: the proof that this harness gives tuned-lens what it needs.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import transformers as tr

_SMALL = {
    "EleutherAI/pythia-70m-deduped": lambda: tr.GPTNeoXConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32),
    "bigscience/bloom-560m": lambda: tr.BloomConfig(vocab_size=64, hidden_size=16, n_layer=3,
                                                    n_head=2),
    "EleutherAI/gpt-neo-125M": lambda: tr.GPTNeoConfig(
        vocab_size=64, hidden_size=16, num_layers=3, num_heads=2,
        attention_types=[[["global", "local"], 1], [["global"], 1]], bos_token_id=0,
        eos_token_id=0),
    "facebook/opt-125m": lambda: tr.OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, ffn_dim=32,
        word_embed_proj_dim=16, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=1),
    "gpt2": lambda: tr.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=64,
                                  bos_token_id=0, eos_token_id=0),
}


def _config(cls: Any, name: str, *args: Any, **kwargs: Any) -> tr.PretrainedConfig:
    if name not in _SMALL:
        raise ValueError(f"no stand-in config for {name!r}")
    return _SMALL[name]()


tr.AutoConfig.from_pretrained = classmethod(_config)


class Dataset:
    """``datasets.Dataset`` as a name (tuned-lens's conftest annotates with it)."""

    @classmethod
    def from_json(cls, path: str) -> Dataset:
        raise NotImplementedError("no datasets here: the model-surgery tests use none")


_datasets = types.ModuleType("datasets")
_datasets.Dataset = Dataset
sys.modules["datasets"] = _datasets
