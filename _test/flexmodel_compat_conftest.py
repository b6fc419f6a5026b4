"""conftest.py for running FlexModel 0.1.0's own tests against flex_surgery, unchanged.

``_test/test_flexmodel_compat.py`` copies this file as ``conftest.py`` next to the test files
it extracts from FlexModel's wheel. FlexModel's tests are written for a GPU node: they import
``flex_model``, load OPT-350m from ``/model-weights``, call ``.cuda()`` and start an NCCL process
group. This file provides those things without editing a test body:

- ``flex_model`` and ``flex_model.core`` are aliases of :mod:`flex_surgery.hooks`;
- ``make_opt_350m`` builds a random-weight OPT from a ``transformers`` config with the module
  names and sizes the tests rely on (at least 19 decoder layers, token ids up to 15000; the
  trainable-module test applies ``nn.Linear(1024, 1024)`` to an ``fc2`` output, so that test
  gets OPT-350m's hidden size 1024 and every other test a hidden size of 64 to stay fast). Like
  ``from_pretrained`` it returns the model in eval mode, and every call gives the same weights;
- ``opt_tokenizer`` is a word-level tokenizer built in memory (ids and padding are all the
  tests use);
- the process group is a world of one on the backend for the device (gloo without CUDA): the
  hard-coded ``"nccl"`` is replaced, the rendezvous variables are set, and the group is
  destroyed after each test (FlexModel's wrapper tests never destroy theirs);
- without CUDA, ``.cuda()`` on modules and tensors keeps them where they are.

With ``FLEX_COMPAT_TARGET=flex_model`` the tests run against FlexModel 0.1.0 itself (its wheel on
``PYTHONPATH``), whose own ``new_group(backend="nccl")`` then also gets the device's backend:
that run is the proof that this harness gives FlexModel what it needs (12 passed).
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn

import flex_surgery.hooks as _hooks
from flex_surgery.models.tiny import tiny_hf_model
from flex_surgery.parallel.backend import backend_for_device

AGAINST_FLEX_MODEL = os.environ.get("FLEX_COMPAT_TARGET") == "flex_model"
if not AGAINST_FLEX_MODEL:
    _flex_model = types.ModuleType("flex_model")
    _flex_model.core = _hooks
    sys.modules["flex_model"] = _flex_model
    sys.modules["flex_model.core"] = _hooks

_VOCAB = 16_000  # FlexModel's tests draw token ids below 15000
_LAYERS = 19  # they hook model.decoder.layers.18
_WIDE_TESTS = {"test_trainable_module_gradient"}  # applies nn.Linear(1024, 1024) to fc2's output
_built: dict[int, nn.Module] = {}


def _opt(hidden_size: int) -> nn.Module:
    if hidden_size not in _built:
        _built[hidden_size] = tiny_hf_model(
            "opt", seed=0, vocab_size=_VOCAB, hidden_size=hidden_size, ffn_dim=32,
            num_hidden_layers=_LAYERS, num_attention_heads=4, word_embed_proj_dim=32,
            max_position_embeddings=128)
    return copy.deepcopy(_built[hidden_size])


@pytest.fixture
def make_opt_350m(request):
    hidden_size = 1024 if request.node.originalname in _WIDE_TESTS else 64
    yield lambda: _opt(hidden_size)


@pytest.fixture
def opt_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ("It 's a nice day we 're having The capital of Canada is What should I eat for "
             "dinner tonight ? There about three people going to").split()
    vocab = {"<unk>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   pad_token="<pad>", padding_side="right")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def world_of_one(monkeypatch):
    """A one-rank process group on the device's backend, wherever the tests start one."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    init = dist.init_process_group

    def init_on_device_backend(backend=None, *args, **kwargs):
        return init(backend_for_device(), *args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", init_on_device_backend)
    if AGAINST_FLEX_MODEL:
        new_group = dist.new_group

        def new_group_on_device_backend(*args, backend=None, **kwargs):
            return new_group(*args, backend=backend_for_device(), **kwargs)

        monkeypatch.setattr(dist, "new_group", new_group_on_device_backend)
    if not torch.cuda.is_available():
        monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **k: self)
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
