"""PEFT LoRA layers are one linear to SurgicalTheater: every modification of a LoRA model equals
the same modification of its merged copy (``merge_and_unload()``), and the LoRA model comes
back bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from rank_pool import distributed
from test_surgery_support import differing_bytes, raw_state

from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.surgery import SurgicalTheater, active_theaters

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
TIGHT = dict(rtol=1e-5, atol=1e-6)


def _effective_shift(p: torch.Tensor) -> torch.Tensor:
    """A custom delta that depends on the whole effective weight (not elementwise)."""
    return -0.3 * p + 0.01 * p.mean()


MODIFICATIONS = {
    "scale": dict(modification_type="scale", factor=0.5),
    "disable": dict(modification_type="disable"),
    "noise": dict(modification_type="noise", noise_scale=0.05, seed=3),
    "custom": dict(modification_fn=_effective_shift),
}


def _lora_model(dtype=torch.float32, r=4, targets=tuple(TARGETS), **config):
    """A tiny Llama with a LoRA adapter whose B factors are not zero (as after training)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_hf_model("llama", dtype=dtype)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0,
                     **config)
    lora = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return lora.eval()


def _merged(lora):
    return copy.deepcopy(lora).merge_and_unload()


@pytest.mark.parametrize("kind", sorted(MODIFICATIONS))
@pytest.mark.parametrize("layers", [[0], "model.layers.*.mlp", None])
def test_modification_equals_the_merged_model_and_restores_bit_exactly(kind, layers):
    lora = _lora_model()
    merged = _merged(lora)
    x = example_inputs("llama")
    before = raw_state(lora)
    with torch.no_grad():
        base = lora(**x).logits
        torch.testing.assert_close(base, merged(**x).logits, **TIGHT)
        with SurgicalTheater(lora, layers=layers, **MODIFICATIONS[kind]):
            got = lora(**x).logits
        with SurgicalTheater(merged, layers=layers, **MODIFICATIONS[kind]):
            want = merged(**x).logits
    assert not torch.allclose(want, base, **TIGHT)  # the modification does something
    torch.testing.assert_close(got, want, **TIGHT)
    assert differing_bytes(before, raw_state(lora)) == 0
    torch.testing.assert_close(lora(**x).logits, base, rtol=0, atol=0)


def test_scale_scales_the_base_and_one_factor():
    lora = _lora_model()
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    w, a, b = (t.detach().clone() for t in (layer.base_layer.weight, layer.lora_A.default.weight,
                                            layer.lora_B.default.weight))
    with SurgicalTheater(lora, layers=[0], modification_type="scale", factor=0.5) as t:
        assert torch.equal(layer.base_layer.weight, w * 0.5)
        assert torch.equal(layer.lora_B.default.weight, b * 0.5)
        assert torch.equal(layer.lora_A.default.weight, a)  # not 0.25 of the adapter
        assert "model.layers.0.self_attn.q_proj.lora_B.default.weight" in t.modified_names
        assert not any("lora_A" in n for n in t.modified_names)


def test_disable_zeroes_the_layer_output():
    lora = _lora_model()
    layer = lora.base_model.model.model.layers[0].mlp.up_proj
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    with torch.no_grad(), SurgicalTheater(lora, layers="model.layers.0.mlp.up_proj",
                                          modification_type="disable"):
        lora(**example_inputs("llama"))
    handle.remove()
    assert seen["out"].abs().max() == 0


def test_custom_receives_the_effective_weight():
    lora = _lora_model()
    merged = _merged(lora)
    seen = []

    def record(p):
        seen.append(p.clone())
        return torch.zeros_like(p)

    with SurgicalTheater(lora, layers="model.layers.1.self_attn.v_proj", modification_fn=record):
        pass
    torch.testing.assert_close(seen[0], merged.model.layers[1].self_attn.v_proj.weight,
                               rtol=0, atol=0)


def test_raw_parameters_named_exactly_are_modified_alone():
    lora = _lora_model()
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    b = layer.lora_B.default.weight.detach().clone()
    w = layer.base_layer.weight.detach().clone()
    name = "model.layers.0.self_attn.q_proj.base_layer.weight"
    with SurgicalTheater(lora, layers=name, modification_type="scale", factor=0.5) as t:
        assert t.modified_names == [name]
        assert torch.equal(layer.base_layer.weight, w * 0.5)
        assert torch.equal(layer.lora_B.default.weight, b)
    with SurgicalTheater(lora, layers="model.layers.0.self_attn.q_proj.lora_B.default.weight",
                         modification_type="disable"):
        assert (layer.lora_B.default.weight == 0).all()
        assert torch.equal(layer.base_layer.weight, w)


def test_disabled_adapters_leave_the_factors_alone():
    lora = _lora_model()
    plain = tiny_hf_model("llama")
    x = example_inputs("llama")
    before = raw_state(lora)
    with torch.no_grad(), lora.disable_adapter():
        with SurgicalTheater(lora, layers=[0], modification_type="scale", factor=0.5) as t:
            got = lora(**x).logits
            assert not any("lora_" in n for n in t.modified_names)
        with SurgicalTheater(plain, layers=[0], modification_type="scale", factor=0.5):
            want = plain(**x).logits
    torch.testing.assert_close(got, want, **TIGHT)
    assert differing_bytes(before, raw_state(lora)) == 0


def test_state_dict_inside_returns_the_original_adapter_and_base():
    lora = _lora_model()
    orig = {k: v.clone() for k, v in lora.state_dict().items()}
    with SurgicalTheater(lora, modification_type="scale", factor=0.5):
        sd = lora.state_dict()
    assert sd.keys() == orig.keys()
    for k, v in orig.items():
        assert torch.equal(sd[k], v), k


def test_bf16_restore_is_bit_exact():
    lora = _lora_model(torch.bfloat16)
    before = raw_state(lora)
    x = example_inputs("llama")
    for kind in sorted(MODIFICATIONS):
        with torch.no_grad(), SurgicalTheater(lora, layers=[1], **MODIFICATIONS[kind]):
            lora(**x)
        assert differing_bytes(before, raw_state(lora)) == 0, kind


def test_lora_variants_are_an_error_naming_the_layer():
    lora = _lora_model(use_dora=True)
    before = raw_state(lora)
    with pytest.raises(NotImplementedError, match=r"model.layers.0.self_attn.q_proj.*DoRA"):
        SurgicalTheater(lora, layers=[0], modification_type="scale").__enter__()
    assert differing_bytes(before, raw_state(lora)) == 0 and active_theaters() == ()


def test_selecting_a_factor_twice_is_an_error():
    lora = _lora_model()
    with pytest.raises(ValueError, match="selected twice"):
        SurgicalTheater(lora, layers=[0, "model.layers.0.self_attn.q_proj.lora_B.default.weight"],
                        modification_type="scale").__enter__()
    assert active_theaters() == ()


def test_the_effective_weight_by_name_and_conv1d_layers():
    """GPT-2's Conv1D LoRA layers (``fan_in_fan_out``) and a LoRA weight named as after merging."""
    from peft import LoraConfig, get_peft_model

    model = tiny_hf_model("gpt2")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                     fan_in_fan_out=True)
    lora = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    lora.eval()
    merged = _merged(lora)
    x = example_inputs("gpt2")
    before = raw_state(lora)
    for layers in ("transformer.h.0.attn.c_attn.weight", [1]):
        for kind in sorted(MODIFICATIONS):
            with torch.no_grad():
                with SurgicalTheater(lora, layers=layers, **MODIFICATIONS[kind]):
                    got = lora(**x).logits
                with SurgicalTheater(merged, layers=layers, **MODIFICATIONS[kind]):
                    want = merged(**x).logits
            torch.testing.assert_close(got, want, **TIGHT, msg=lambda m, k=kind: f"{k}: {m}")
            assert differing_bytes(before, raw_state(lora)) == 0, kind


@pytest.mark.parametrize("layout", ["fsdp1_orig", "fsdp1_flat", "fsdp2"])
@distributed(world_size=2)
def test_lora_under_fsdp_equals_the_merged_model(layout):
    """Each rank edits its shards of the base weight and of B (custom gathers A and B): the
    sharded LoRA model equals the one-process merged model, and every shard comes back."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    lora = _lora_model()
    merged = _merged(lora)
    inner = lora.base_model.model
    if layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        for layer in inner.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(inner, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if layout == "fsdp1_flat":  # one flat parameter needs one requires_grad
            for p in lora.parameters():
                p.requires_grad_(True)
        lora.base_model.model = FSDP(inner, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                     use_orig_params=layout == "fsdp1_orig",
                                     device_id=torch.device("cpu"))
    x = example_inputs("llama", seed=dist.get_rank())
    with torch.no_grad():
        base = lora(**x).logits
        torch.testing.assert_close(base, merged(**x).logits, **TIGHT)
    before = raw_state(lora)
    # _effective_shift reads the whole weight (its mean): sharded, it needs full_parameter.
    mods = {**MODIFICATIONS, "custom": {**MODIFICATIONS["custom"], "full_parameter": True},
            "custom_elementwise": dict(modification_fn=lambda p: -0.3 * p)}
    for kind in sorted(mods):
        with torch.no_grad():
            with SurgicalTheater(lora, layers=[0], **mods[kind]):
                got = lora(**x).logits
            with SurgicalTheater(merged, layers=[0], **mods[kind]):
                want = merged(**x).logits
        assert not torch.allclose(want, base, **TIGHT), kind
        torch.testing.assert_close(got, want, **TIGHT, msg=lambda m, k=kind: f"{k}: {m}")
        assert differing_bytes(before, raw_state(lora)) == 0, kind
