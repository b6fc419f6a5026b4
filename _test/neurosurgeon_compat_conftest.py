"""conftest.py for running NeuroSurgeon 0.1.0's own model tests against flex_surgery, unchanged.

``_test/test_neurosurgeon_compat.py`` copies this file as ``conftest.py`` next to the test files
it extracts from NeuroSurgeon's wheel. Those tests download checkpoints and datasets from the
Hugging Face Hub (bert-tiny, tiny-gpt2, resnet-18, two ViTs; GLUE CoLA, beans, a cat picture).
This file stands in for the Hub without editing a test body:

- ``from_pretrained`` of a ``transformers`` model builds it from a config with random weights:
  the same module names as the checkpoint (layer counts, ``Conv1D`` / ``nn.Linear`` /
  ``nn.Conv2d`` types), smaller widths where the tests do not depend on them. Like
  ``from_pretrained`` it returns the model in eval mode, and every call gives the same weights
  (the tests compare a fresh model's outputs with a wrapped one's);
- ``from_pretrained`` of a tokenizer gives a word-level tokenizer built in memory (ids,
  padding to ``max_length`` and truncation are all the tests use); of an image processor, a
  ``ViTImageProcessor`` at the model's image size;
- ``datasets.load_dataset`` gives small in-memory datasets with the columns the tests read
  (``sentence`` / ``label`` / ``idx`` for CoLA, ``image`` / ``image_file_path`` / ``labels``
  for beans, ``image`` for the cat) behind the few ``datasets`` methods the tests call.

With ``NEUROSURGEON_COMPAT_TARGET=neurosurgeon`` the same files run against NeuroSurgeon 0.1.0
itself: the proof that this harness gives NeuroSurgeon what it needs.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import (
    BertConfig,
    GPT2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ResNetConfig,
    ViTConfig,
    ViTImageProcessor,
)

# -- models ------------------------------------------------------------------------------------

_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, max_position_embeddings=64)
_CONFIGS = {
    "prajjwal1/bert-tiny": (BertConfig, _BERT),
    "bert-base-uncased": (BertConfig, _BERT),
    "sshleifer/tiny-gpt2": (GPT2Config, dict(vocab_size=64, n_embd=8, n_layer=2, n_head=2,
                                             n_positions=64, pad_token_id=1)),
    "microsoft/resnet-18": (ResNetConfig, dict(embedding_size=8, hidden_sizes=[8, 8, 16, 16],
                                               depths=[2, 2, 2, 2], layer_type="basic",
                                               num_labels=3)),
    "lysandre/tiny-vit-random": (ViTConfig, dict(hidden_size=16, num_hidden_layers=12,
                                                 num_attention_heads=2, intermediate_size=32,
                                                 image_size=32, patch_size=8, num_labels=3)),
    "google/vit-base-patch16-224": (ViTConfig, dict(hidden_size=16, num_hidden_layers=12,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    image_size=32, patch_size=8,
                                                    num_labels=3)),
}
_IMAGE_SIZE = 32


def _model_from_config(cls: type, name: str, *args: Any, **kwargs: Any) -> PreTrainedModel:
    config_cls, sizes = _CONFIGS[name]
    config = config_cls(**{**sizes, **kwargs})
    with torch.random.fork_rng():
        torch.manual_seed(0)  # every call gives the same weights, as a checkpoint does
        model = cls(config)
    return model.eval()


# -- tokenizers and image processors -------------------------------------------------------------

_WORDS = ("Hello , this is a test . The cat sat on the mat The dog barked loudly John ate "
          "the apple quickly She is reading a book Mary thinks that Bill left What did you "
          "see ? They sang songs all night").split()


def _tokenizer(cls: type, name: str, *args: Any, **kwargs: Any) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    specials = ["<unk>", "<|endoftext|>", "[PAD]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + _WORDS))}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    pad = kwargs.get("pad_token", "[PAD]")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   pad_token=pad, model_max_length=16, padding_side="right")


def _image_processor(cls: Any, name: str, *args: Any, **kwargs: Any) -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE})


def _from_pretrained(stand_in):
    return classmethod(lambda cls, name, *args, **kwargs: stand_in(cls, name, *args, **kwargs))


PreTrainedModel.from_pretrained = _from_pretrained(_model_from_config)
PreTrainedTokenizerBase.from_pretrained = _from_pretrained(_tokenizer)
transformers.AutoImageProcessor.from_pretrained = _from_pretrained(_image_processor)


# -- datasets ------------------------------------------------------------------------------------

class _Dataset:
    """The part of ``datasets.Dataset`` the tests use: columns, ``map(batched=True)``, column
    removal and renaming, ``with_format("torch")``, ``select``, rows for a DataLoader."""

    def __init__(self, columns: dict[str, list], torch_format: bool = False) -> None:
        self.columns = columns
        self.torch_format = torch_format

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self.columns[key]
        row = {k: v[key] for k, v in self.columns.items()}
        return {k: torch.as_tensor(v) for k, v in row.items()} if self.torch_format else row

    def map(self, fn, batched: bool = False) -> _Dataset:
        assert batched, "the tests map batched"
        out = dict(fn(dict(self.columns)))
        added = {k: list(v) for k, v in out.items()}  # rows keep their tensors' dtype
        return _Dataset({**self.columns, **added}, self.torch_format)

    def remove_columns(self, names: list[str]) -> _Dataset:
        return _Dataset({k: v for k, v in self.columns.items() if k not in names},
                        self.torch_format)

    def rename_column(self, old: str, new: str) -> _Dataset:
        return _Dataset({(new if k == old else k): v for k, v in self.columns.items()},
                        self.torch_format)

    def with_format(self, kind: str) -> _Dataset:
        assert kind == "torch"
        return _Dataset(self.columns, torch_format=True)

    def select(self, indices) -> _Dataset:
        indices = list(indices)
        return _Dataset({k: [v[i] for i in indices] for k, v in self.columns.items()},
                        self.torch_format)


class _DatasetDict(dict):
    def _each(self, method: str, *args: Any, **kwargs: Any) -> _DatasetDict:
        return _DatasetDict({k: getattr(v, method)(*args, **kwargs) for k, v in self.items()})

    def map(self, *a, **k):
        return self._each("map", *a, **k)

    def remove_columns(self, *a, **k):
        return self._each("remove_columns", *a, **k)

    def rename_column(self, *a, **k):
        return self._each("rename_column", *a, **k)

    def with_format(self, *a, **k):
        return self._each("with_format", *a, **k)


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def load_dataset(path: str, name: str | None = None, **kwargs: Any) -> _DatasetDict:
    rng = np.random.default_rng(0)
    if (path, name) == ("glue", "cola"):
        n = 32
        sentences = [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 12))))
                     for _ in range(n)]
        return _DatasetDict(train=_Dataset({"sentence": sentences,
                                            "label": rng.integers(0, 2, n).tolist(),
                                            "idx": list(range(n))}))
    if path == "beans":
        n = 24
        return _DatasetDict(train=_Dataset({"image_file_path": [f"{i}.jpg" for i in range(n)],
                                            "image": _images(n, 1),
                                            "labels": rng.integers(0, 3, n).tolist()}))
    if path == "huggingface/cats-image":
        return _DatasetDict(test=_Dataset({"image": _images(1, 2)}))
    raise ValueError(f"no stand-in for dataset {path!r} {name!r}")


_datasets = types.ModuleType("datasets")
_datasets.load_dataset = load_dataset
sys.modules["datasets"] = _datasets
