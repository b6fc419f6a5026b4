"""The per-architecture table: every listed part exists in the real transformers classes, wrapped
models resolve through their wrappers, and unknown architectures or missing parts raise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flex_surgery.anatomy import (
    ANATOMIES,
    Anatomy,
    MissingPart,
    UnknownArchitecture,
    block_names,
    locate,
    register_anatomy,
)
from flex_surgery.models import TINY_ARCHITECTURES, tiny_hf_model

EXPECTED = {  # arch: (blocks, final norm class name or None, unembedding present)
    "llama": ("model.layers", "LlamaRMSNorm", True),
    "gpt2": ("transformer.h", "LayerNorm", True),
    "opt": ("model.decoder.layers", "LayerNorm", True),
    "bert": ("encoder.layer", None, False),
    "vit": ("layers", "LayerNorm", False),
}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_models_resolve_every_part(arch):
    model = tiny_hf_model(arch)
    loc = locate(model)
    blocks, norm, has_unembed = EXPECTED[arch]
    assert loc.name("blocks") == blocks
    assert isinstance(loc.blocks, nn.ModuleList) and len(loc.blocks) == 2
    assert block_names(model) == [f"{blocks}.0", f"{blocks}.1"]
    assert isinstance(loc.module("embed"), (nn.Embedding, nn.Conv2d))
    if norm is None:
        with pytest.raises(MissingPart, match="final norm"):
            loc.module("final_norm")
    else:
        assert type(loc.module("final_norm")).__name__ == norm
    if has_unembed:
        assert loc.module("unembed").weight.shape[0] == 128  # vocabulary
    else:
        with pytest.raises(MissingPart):
            loc.module("unembed")


@pytest.mark.parametrize("cls", ["MistralForCausalLM", "Qwen2ForCausalLM"])
def test_llama_family_entries_match_the_real_classes(cls):
    import transformers as tf

    config_cls = getattr(tf, cls.replace("ForCausalLM", "Config"))
    config = config_cls(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=2, num_key_value_heads=1)
    model = getattr(tf, cls)(config)
    loc = locate(model)
    assert len(loc.blocks) == 3 and loc.block_name(-1) == "model.layers.2"
    assert loc.module("final_norm") is model.model.norm and loc.module("unembed") is model.lm_head


def test_bare_model_inside_a_wrapper_gets_a_prefix():
    wrapper = nn.Module()
    wrapper.inner = tiny_hf_model("gpt2").transformer
    loc = locate(wrapper)
    assert (loc.arch, loc.prefix) == ("GPT2Model", "inner")
    assert loc.block_name(1) == "inner.h.1"
    with pytest.raises(IndexError, match="2 blocks"):
        loc.block_name(2)


def test_unknown_architecture_raises_with_the_known_ones():
    with pytest.raises(UnknownArchitecture, match="LlamaForCausalLM.*register_anatomy"):
        locate(nn.Sequential(nn.Linear(2, 2)))


def test_register_a_custom_architecture():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([nn.Linear(2, 2)])
            self.out = nn.Linear(2, 2)

    register_anatomy("Tiny", Anatomy("stack", None, None, "out"))
    try:
        assert block_names(Tiny()) == ["stack.0"]
    finally:
        del ANATOMIES["Tiny"]


def _neox_bloom_neo(name: str):
    import transformers as tf

    configs = {
        "GPTNeoX": tf.GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=32),
        "Bloom": tf.BloomConfig(vocab_size=32, hidden_size=16, n_layer=3, n_head=2),
        "GPTNeo": tf.GPTNeoConfig(vocab_size=32, hidden_size=16, num_layers=3, num_heads=2,
                                  attention_types=[[["global", "local"], 1], [["global"], 1]],
                                  bos_token_id=0, eos_token_id=0),
    }
    torch.manual_seed(0)
    return getattr(tf, f"{name}ForCausalLM")(configs[name]).eval()


@pytest.mark.parametrize("name", ["GPTNeoX", "Bloom", "GPTNeo"])
def test_neox_bloom_and_neo_parts_and_their_lens_at_the_last_block_is_the_models_answer(name):
    """The entries point at the real modules (the causal LM and its base model), and the lens,
    which decodes a block's output through the final norm and the head, gives at the last
    block the model's own prediction: the parts are the ones the model computes with."""
    from flex_surgery.lens import LogitLens

    model = _neox_bloom_neo(name)
    base = model.base_model
    loc, base_loc = locate(model), locate(base)
    assert loc.blocks is base_loc.blocks and len(loc.blocks) == 3
    assert loc.module("final_norm") is base_loc.module("final_norm")
    assert isinstance(loc.module("final_norm"), nn.LayerNorm)
    assert loc.module("unembed") is model.get_output_embeddings()
    assert loc.module("embed") is base.get_input_embeddings()
    with pytest.raises(MissingPart):
        base_loc.module("unembed")
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    with LogitLens(model, top_k=1) as lens:
        got = lens(input_ids=ids)
    assert got.tokens.shape[0] == 3
    assert torch.equal(got.tokens[-1, ..., 0], logits.argmax(-1))


def test_table_has_no_silent_gaps():
    for name, anatomy in ANATOMIES.items():
        assert anatomy.blocks, name  # every entry knows its blocks


def test_locate_does_not_guess_inside_an_unknown_architecture_with_two_known_parts():
    """VisionEncoderDecoderModel (not in ANATOMIES) holds a ViTModel encoder and a
    GPT2LMHeadModel decoder: the first one met (the encoder) was taken, so ModelSurgery and the
    lens acted on the vision blocks without a word. Two known parts are ambiguous: an error
    naming both; each part on its own is located."""
    import transformers as tf

    from flex_surgery.anatomy import UnknownArchitecture, locate

    enc = tf.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, image_size=8, patch_size=4)
    dec = tf.GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=32, n_positions=16,
                        add_cross_attention=True, is_decoder=True, bos_token_id=0,
                        eos_token_id=0)
    model = tf.VisionEncoderDecoderModel(
        tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    with pytest.raises(UnknownArchitecture, match="ViTModel at 'encoder'.*GPT2LMHeadModel"):
        locate(model)
    assert locate(model.decoder).arch == "GPT2LMHeadModel"


def test_a_part_named_differently_across_releases_is_found_under_either_name():
    """ViT's blocks are ``layers`` in transformers 5 and ``encoder.layer`` in 4: whichever the
    model holds is the part; a model holding neither raises MissingPart naming both."""
    def vit(blocks_at: str | None) -> nn.Module:
        model = type("ViTModel", (nn.Module,), {})()
        model.layernorm = nn.LayerNorm(4)
        model.embeddings = nn.Module()
        model.embeddings.patch_embeddings = nn.Module()
        model.embeddings.patch_embeddings.projection = nn.Conv2d(3, 4, 2)
        if blocks_at == "encoder.layer":
            model.encoder = nn.Module()
            model.encoder.layer = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        elif blocks_at == "layers":
            model.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        return model

    old = vit("encoder.layer")
    assert locate(old).blocks is old.encoder.layer
    assert locate(old).block_name(-1) == "encoder.layer.2"
    new = vit("layers")
    assert locate(new).blocks is new.layers
    with pytest.raises(MissingPart, match=r"\['layers', 'encoder.layer'\]"):
        locate(vit(None)).module("blocks")
