"""Second reader of the NeuroSurgeon / tuned-lens / FlexModel compatibility names and of circuit
masks on Megatron-core layers.

Strict xfails are bugs found (the reason says what is wrong, where, and what one process or the
peer does); plain tests pin behaviour that was checked and is right.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_pool import distributed
from torch import nn

from flex_surgery.surgery import model_surgery as fs_ms
from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel
from flex_surgery.surgery.layers import PassThrough

TUNED_LENS_SDIST = Path(__file__).resolve().parent.parent / ".cache" / "tuned-lens-0.2.0" / \
    "tuned-lens-0.2.0.tar.gz"


# -- helpers ---------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.b = nn.Linear(4, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.relu(self.a(x))))


def _config(targets: list[str], **kw) -> CircuitConfig:
    hp = dict(mask_init_value=0.5, **kw.pop("hp", {}))
    return CircuitConfig(mask_hparams=hp, target_layers=targets, **kw)


def _x() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tuned_lens_ms(tmp_path_factory):
    """tuned-lens 0.2.0's own ``model_surgery`` module, from its source archive."""
    if not TUNED_LENS_SDIST.exists():
        pytest.skip("tuned-lens 0.2.0's source archive is not in .cache/")
    out = tmp_path_factory.mktemp("tuned_lens") / "model_surgery.py"
    with tarfile.open(TUNED_LENS_SDIST) as archive:
        out.write_bytes(archive.extractfile(
            "tuned-lens-0.2.0/tuned_lens/model_surgery.py").read())
    spec = importlib.util.spec_from_file_location("tuned_lens_model_surgery_0_2_0", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpt2():
    import transformers as tr

    torch.manual_seed(0)
    config = tr.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=32,
                           bos_token_id=0, eos_token_id=0)
    return tr.GPT2LMHeadModel(config).eval()


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


# == NeuroSurgeon names on CircuitModel ========================================================
def test_mask_params_are_the_circuit_logits_and_go_with_remove_masks():
    model = Net()
    keys = list(model.state_dict())
    circuit = CircuitModel(_config(["a", "b"], hp=dict(mask_bias=True)), model)
    assert model.a.weight_mask_params is circuit.mask_logits["a-weight"]
    assert model.b.bias_mask_params is circuit.mask_logits["b-bias"]
    assert list(model.state_dict()) == keys  # not parameters of the model
    # NeuroSurgeon code edits the logits in place: the mask follows.
    circuit.eval()
    with torch.no_grad():
        model.a.weight_mask_params.fill_(-1.0)
    out = model.a(_x())
    torch.testing.assert_close(out, model.a.bias.expand_as(out))
    circuit.remove_masks()
    circuit.remove_masks()  # twice: nothing left to remove, no error
    assert not any(hasattr(m, f"{p}_mask_params") for m in (model.a, model.b)
                   for p in ("weight", "bias"))
    assert list(model.state_dict()) == keys


def test_user_attribute_named_weight_mask_params_is_refused_before_any_change():
    model = Net()
    model.a.weight_mask_params = "mine"
    before = [(p.requires_grad, len(m._forward_pre_hooks)) for m in model.modules()
              for p in m.parameters(recurse=False)]
    with pytest.raises(ValueError, match="a.weight_mask_params"):
        CircuitModel(_config(["a"]), model)
    assert model.a.weight_mask_params == "mine"
    assert [(p.requires_grad, len(m._forward_pre_hooks)) for m in model.modules()
            for p in m.parameters(recurse=False)] == before


def test_l0_term_and_layer_modes_follow_the_circuit_mode():
    model = Net()
    circuit = CircuitModel(_config(["a"]), model)
    assert model.a.training and not model.b.training and not model.drop.training
    assert float(circuit._compute_l0_loss().detach()) == pytest.approx(16 * torch.sigmoid(
        torch.tensor(0.5)).item())
    circuit.eval()
    assert not model.a.training and circuit._compute_l0_loss() == 0.0
    circuit.use_masks(False, ["wrapped_model.a"])
    torch.testing.assert_close(model.a(_x()), F.linear(_x(), model.a.weight, model.a.bias))


def test_a_second_circuit_on_other_layers_leaves_the_model_frozen_after_both_are_removed():
    model = Net().train()
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    first = CircuitModel(_config(["a"]), model)
    try:
        second = CircuitModel(_config(["b"]), model)
    except ValueError:  # refused, as the docs say for a model inside another CircuitModel
        first.remove_masks()
        second = None
    else:
        first.remove_masks()
        second.remove_masks()
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes


def test_remove_masks_twice_keeps_what_the_user_did_in_between():
    model = Net()
    circuit = CircuitModel(_config(["a"]), model)
    got = circuit.remove_masks()
    got.a.weight.requires_grad_(False)
    got.eval()
    circuit.remove_masks()
    assert not model.a.weight.requires_grad
    assert not model.training and not model.a.training


def test_deepcopy_of_a_circuit_masks_with_its_own_logits():
    circuit = CircuitModel(_config(["a"]), Net())
    circuit.eval()
    twin = copy.deepcopy(circuit)
    assert twin.wrapped_model.a.weight_mask_params is twin.mask_logits["a-weight"]
    with torch.no_grad():
        twin.wrapped_model.a.weight_mask_params.fill_(-1.0)  # the twin's hard mask is all 0
    out = twin.wrapped_model.a(_x())
    torch.testing.assert_close(out, twin.wrapped_model.a.bias.expand_as(out))
    original = circuit.wrapped_model.a(_x())  # the original still masks with its own logits
    assert not torch.allclose(original, circuit.wrapped_model.a.bias.expand_as(original))
    twin.remove_masks()  # removes the twin's hooks only
    torch.testing.assert_close(circuit.wrapped_model.a(_x()), original)
    assert circuit.wrapped_model.a._forward_pre_hooks
    assert not twin.wrapped_model.a._forward_pre_hooks


def test_assigning_weight_mask_params_is_refused_at_the_next_forward():
    """Assigning a new Parameter to a masked layer's weight_mask_params (nn.Module registers it
    as a parameter of the model, which the circuit does not mask with) makes the layer's next
    forward raise, naming the in-place way; after remove_masks() the user's own parameter is
    left where they put it, and the circuit's alias is gone."""
    model = Net()
    circuit = CircuitModel(_config(["a"]), model)
    circuit.eval()
    model.a.weight_mask_params = nn.Parameter(torch.full((4, 4), -1.0))
    with pytest.raises(ValueError, match=r"a.weight_mask_params was replaced.*data.copy_"):
        model.a(_x())
    assert torch.equal(model.a.weight, Net().a.weight)  # the forward left the weight in place
    circuit.remove_masks()
    assert "weight_mask_params" in dict(model.a.named_parameters())  # the user's, kept
    assert "weight_mask_params" not in model.a.__dict__


def test_use_masks_takes_the_names_masked_layers_reports():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wrapped_model = Net()

        def forward(self, x):
            return self.wrapped_model(x)

    circuit = CircuitModel(_config(["wrapped_model.a"]), Outer())
    for name in circuit.masked_layers:
        circuit.use_masks(False, [name])


@pytest.mark.parametrize("method", ["continuous_sparsification", "hard_concrete",
                                    "magnitude_pruning"])
def test_torch_save_of_a_circuit_loads_an_independent_equal_circuit(method):
    hp = {"magnitude_pruning": {"prune_percentage": 0.5},
          "hard_concrete": {"mask_init_percentage": 0.7}}.get(method, {"mask_init_value": 0.5})
    circuit = CircuitModel(CircuitConfig(mask_method=method, mask_hparams=hp,
                                         target_layers=["a"]), Net())
    if method != "magnitude_pruning":
        with torch.no_grad():
            circuit.mask_logits["a-weight"].copy_(torch.randn(4, 4, generator=
                                                              torch.Generator().manual_seed(2)))
    circuit.eval()
    buffer = io.BytesIO()
    torch.save(circuit, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(_x()), circuit(_x()))
    masks = circuit.hard_masks()["a.weight"]
    assert torch.equal(loaded.hard_masks()["a.weight"], masks)
    with torch.no_grad():  # the loaded circuit masks with its own logits and weights
        loaded.wrapped_model.a.weight.mul_(torch.linspace(0.1, 3.0, 16).view(4, 4))
        if method != "magnitude_pruning":
            loaded.mask_logits["a-weight"].neg_()
    assert not torch.equal(loaded(_x()), circuit(_x()))
    assert torch.equal(circuit.hard_masks()["a.weight"], masks)
    model = loaded.remove_masks()
    assert "weight_mask_params" not in model.a.__dict__
    assert not model.a._forward_pre_hooks



@distributed(world_size=2)
def test_a_mask_params_clash_on_one_rank_is_refused_on_every_rank():
    model = Net()
    if dist.get_rank() == 0:
        model.a.weight_mask_params = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="weight_mask_params"):
        CircuitModel(_config(["a"]), model)

# == tuned-lens's model_surgery functions =====================================================
@pytest.mark.parametrize("order", [[-1, 0, 1], [-1, -2, -3], [], [2, 2, 2], (2, 1, 0), [2]],
                         ids=["negative", "negative-permutation", "empty", "repeat", "tuple",
                              "drop"])
def test_permute_layers_runs_as_tuned_lens(tuned_lens_ms, order):
    model = _gpt2()
    layers = model.transformer.h
    with tuned_lens_ms.permute_layers(model, list(order)):
        want = _logits(model)
    with fs_ms.permute_layers(model, order) as got_model:
        assert got_model is model
        assert len(model.transformer.h) == len(order)
        got = _logits(model)
    assert model.transformer.h is layers
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_more_blocks_than_the_model_has_is_refused_by_both_permute_functions():
    """tuned-lens runs [0, 0, 1, 1, 2, 2] on GPT-2 (which loops over its whole list); a Llama
    runs only its first config.num_hidden_layers blocks, so the extra ones would be skipped
    silently. Both permute_layers and permute_layers_ refuse it (a documented difference),
    and nothing changes."""
    model = _gpt2()
    blocks = model.transformer.h
    for call in (lambda: fs_ms.permute_layers(model, [0, 0, 1, 1, 2, 2]).__enter__(),
                 lambda: fs_ms.permute_layers_(model, [0, 1, 2, 0])):
        with pytest.raises(ValueError, match="skipped silently"):
            call()
        assert model.transformer.h is blocks


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_permute_layers_with_numpy_or_torch_indices(tuned_lens_ms, kind):
    import numpy as np

    model = _gpt2()
    order = list(np.array([2, 0, 1])) if kind == "numpy" else list(torch.tensor([2, 0, 1]))
    with tuned_lens_ms.permute_layers(model, order):
        want = _logits(model)
    with fs_ms.permute_layers(model, order):
        got = _logits(model)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_permute_layers_for_good_drops_and_repeats_as_tuned_lens(tuned_lens_ms):
    for order in ([0, 2, 0], [], [-1]):
        theirs, ours = _gpt2(), _gpt2()
        tuned_lens_ms.permute_layers_(theirs, order)
        fs_ms.permute_layers_(ours, order)
        assert len(ours.transformer.h) == len(order)
        torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=0)


def test_replace_layers_with_fewer_replacements_is_refused_and_nothing_changes():
    """tuned-lens zips (silently replaces only the first); here a clear error, nothing
    installed."""
    model = _gpt2()
    layers, want = model.transformer.h, _logits(model)
    with pytest.raises(ValueError, match="2 indices but 1 replacements"):
        with fs_ms.replace_layers(model, [0, 1], [copy.deepcopy(layers[2])]):
            pass
    assert model.transformer.h is layers
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


def test_context_managers_restore_after_an_error_inside(tuned_lens_ms):
    model = _gpt2()
    layers, want = model.transformer.h, _logits(model)
    with pytest.raises(KeyError):
        with fs_ms.permute_layers(model, [0, 0]):
            with fs_ms.replace_layers(model, [-1], [PassThrough()]):
                with fs_ms.assign_key_path(model, "transformer.ln_f", nn.Identity()):
                    raise KeyError("inside")
    assert model.transformer.h is layers
    assert isinstance(model.transformer.ln_f, nn.LayerNorm)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


def test_assign_key_path_on_a_list_index_and_a_parameter(tuned_lens_ms):
    model = _gpt2()
    block0, weight = model.transformer.h[0], model.lm_head.weight
    results = []
    for lib in (tuned_lens_ms, fs_ms):
        with lib.assign_key_path(model, "transformer.h.0", PassThrough()) as m:
            assert m is model and isinstance(model.transformer.h[0], PassThrough)
            inside = _logits(model)
        assert model.transformer.h[0] is block0
        with lib.assign_key_path(model, "lm_head.weight", nn.Parameter(torch.zeros_like(weight))):
            assert float(_logits(model).abs().sum()) == 0.0
        assert model.lm_head.weight is weight
        results.append(inside)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    assert fs_ms.get_key_path(model, "transformer.h.2") is model.transformer.h[2]


def test_get_final_norm_of_a_model_whose_norm_is_none_is_a_value_error(tuned_lens_ms):
    model = _gpt2()
    model.transformer.ln_f = None
    with pytest.raises(ValueError):
        tuned_lens_ms.get_final_norm(model)
    with pytest.raises(ValueError):
        fs_ms.get_final_norm(model)


def _tiny(arch: str, bare: bool):
    import transformers as tr

    if arch == "neox":
        config = tr.GPTNeoXConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, vocab_size=64, bos_token_id=0,
                                  eos_token_id=0)
        return (tr.GPTNeoXModel if bare else tr.GPTNeoXForCausalLM)(config)
    if arch == "bloom":
        config = tr.BloomConfig(hidden_size=16, n_layer=2, n_head=2, vocab_size=64,
                                bos_token_id=0, eos_token_id=0)
        return (tr.BloomModel if bare else tr.BloomForCausalLM)(config)
    config = tr.GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2, vocab_size=64,
                             attention_types=[[["global", "local"], 1]], bos_token_id=0,
                             eos_token_id=0)
    return (tr.GPTNeoModel if bare else tr.GPTNeoForCausalLM)(config)


@pytest.mark.parametrize("bare", [False, True], ids=["lm", "bare"])
@pytest.mark.parametrize("arch", ["neox", "bloom", "neo"])
def test_new_anatomy_entries_answer_as_tuned_lens(tuned_lens_ms, arch, bare):
    model = _tiny(arch, bare)
    theirs_path, theirs_layers = tuned_lens_ms.get_transformer_layers(model)
    path, layers = fs_ms.get_transformer_layers(model)
    assert layers is theirs_layers and fs_ms.get_key_path(model, path) is layers
    assert fs_ms.get_final_norm(model) is tuned_lens_ms.get_final_norm(model)
    if bare:
        with pytest.raises(ValueError):
            tuned_lens_ms.get_unembedding_matrix(model)
        with pytest.raises(ValueError):
            fs_ms.get_unembedding_matrix(model)
    else:
        assert fs_ms.get_unembedding_matrix(model) is tuned_lens_ms.get_unembedding_matrix(model)



def test_gpt_neox_head_under_transformers_4_layout(tuned_lens_ms):
    import transformers as tr

    def init(self, config):
        tr.GPTNeoXForCausalLM.__init__(self, config)
        self.embed_out = self.lm_head  # transformers 4.x's attribute
        del self.lm_head

    legacy = type("GPTNeoXForCausalLM", (tr.GPTNeoXForCausalLM,),
                  {"__init__": init, "get_output_embeddings": lambda self: self.embed_out})
    model = legacy(_tiny("neox", bare=False).config)
    assert tuned_lens_ms.get_unembedding_matrix(model) is model.embed_out
    assert fs_ms.get_unembedding_matrix(model) is model.embed_out


def test_set_key_path_on_a_module_dict_with_digit_keys(tuned_lens_ms):
    results = []
    for lib in (tuned_lens_ms, fs_ms):
        model = nn.Module()
        model.blocks = nn.ModuleDict({"0": nn.Linear(2, 2), "1": nn.Linear(2, 2)})
        new = nn.Identity()
        lib.set_key_path_(model, "blocks.1", new)
        results.append(model.blocks["1"] is new)
    assert results == [True, True]

# == FlexModel 0.1.0 private names ============================================================
def test_shared_state_and_group_manager_are_the_flexmodels():
    from flex_surgery import FlexModel, HookFunction

    stored: dict = {}
    flex = FlexModel(Net(), stored)
    flex.register_trainable_module("probe", nn.Linear(4, 4))
    hf = HookFunction("a")
    assert hf._shared_state is None  # before registration, as in FlexModel 0.1.0
    flex.register_forward_hook(hf)
    shared = hf._shared_state
    assert shared.output_ptr is stored is flex.output_dict
    assert shared.save_ctx is flex.save_ctx and shared.modules is flex.trainable_modules
    flex.create_hook_group("mine", "b")
    groups = flex._hook_fn_group_manager.hook_fn_to_groups_map
    assert groups[hf] == {"all"}
    assert [g for other, g in groups.items() if other is not hf] == [{"all", "mine"}]
    flex(_x())
    assert "a" in stored
    flex.remove_hook_function(hf)
    assert hf._shared_state is None


@distributed(world_size=2)
def test_shared_state_of_a_hook_of_another_pipeline_stage_is_none():
    from parallel_cases import plain_net
    from pipeline_cases import two_stages

    from flex_surgery import FlexModel, HookFunction

    stored: dict = {}
    flex = FlexModel(two_stages(plain_net(), dist.get_rank()), stored, pipeline_parallel_size=2)
    mine, theirs = HookFunction(f"blocks.{dist.get_rank()}.up"), \
        HookFunction(f"blocks.{1 - dist.get_rank()}.up")
    flex.register_forward_hook(mine)
    flex.register_forward_hook(theirs)
    assert theirs.is_remote and theirs._shared_state is None
    assert mine._shared_state.output_ptr is stored
    assert mine._shared_state.save_ctx is flex.save_ctx
    groups = flex._hook_fn_group_manager.hook_fn_to_groups_map
    assert groups[mine] == groups[theirs] == {"all"}
    flex.restore()


# == circuit masks on Megatron-core layers =====================================================
def _megatron_batch():
    from megatron_cases import B, H, S, token_ids

    return token_ids(seed=4), torch.randn(S, B, H, generator=torch.Generator().manual_seed(5))


def _skip_bias_forward(self, ids):
    """MegatronMLP's forward with the row layer's bias returned (skip_bias_add) and added here,
    after the layer, as Megatron's own MLP does."""
    x = self.embed(ids if self.sequence_parallel else ids.transpose(0, 1))
    h, _ = self.up(x)
    out, bias = self.down(self.act(h))
    return out + bias


def _grads_equal_one_process(sequence_parallel: bool, hp: dict, *, freeze_base: bool,
                             skip_bias_add: bool) -> None:
    import types

    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
    from megatron_cases import megatron_mlp, megatron_parallel, plain_mlp

    ids, y = _megatron_batch()
    config = CircuitConfig(mask_hparams=dict(mask_init_value=0.05, **hp),
                           target_layers=["up", "down"], freeze_base=freeze_base, seed=3)
    with megatron_parallel(tensor_parallel=2):
        model = megatron_mlp(plain_mlp(0), sequence_parallel=sequence_parallel)
        reference = plain_mlp(0)
        if skip_bias_add:
            model.down.skip_bias_add = True
            model.forward = types.MethodType(_skip_bias_forward, model)
        ref = CircuitModel(config, reference, process_group=None)
        par = CircuitModel(config, model)
        out = par(ids)
        if sequence_parallel:
            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        torch.testing.assert_close(out, ref(ids), rtol=1e-5, atol=1e-5)
        F.mse_loss(out, y).backward()
        F.mse_loss(ref(ids), y).backward()
        for name, layer in par._layers.items():
            for pname, mp in layer.params.items():
                want = ref._layers[name].params[pname].logits.grad
                torch.testing.assert_close(mp.logits.grad, mp.region.take(want), rtol=1e-5,
                                           atol=1e-6, msg=f"mask of {name}.{pname}")
                if freeze_base:
                    continue
                base = getattr(getattr(model, name), pname)
                grad = base.grad.clone()
                if getattr(base, "sequence_parallel", False):
                    dist.all_reduce(grad)  # what Megatron's finalize_model_grads does
                want = getattr(getattr(reference, name), pname).grad
                torch.testing.assert_close(grad, mp.param_region.take(want), rtol=1e-5,
                                           atol=1e-6, msg=f"{name}.{pname}")
        par.remove_masks()


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sequence-parallel"])
@pytest.mark.parametrize("unit", ["weight", "neuron"])
@distributed(world_size=2)
def test_megatron_masks_and_unfrozen_base_get_one_process_gradients(unit, sequence_parallel):
    _grads_equal_one_process(sequence_parallel, dict(mask_unit=unit, mask_bias=True),
                             freeze_base=False, skip_bias_add=False)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sequence-parallel"])
@distributed(world_size=2)
def test_megatron_row_bias_mask_with_skip_bias_add(sequence_parallel):
    _grads_equal_one_process(sequence_parallel, dict(mask_unit="neuron", mask_bias=True),
                             freeze_base=True, skip_bias_add=True)
