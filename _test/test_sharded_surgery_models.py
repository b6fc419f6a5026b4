"""Surgery features on sharded *real* models against the same model in one process.

Megatron-core GPTModel at TP=2 (SwiGLU ``linear_fc1`` with ``partition_stride=2``, grouped
queries, ``qk_layernorm``, sequence parallelism) against its TP=1 twin built from the same full
weights, and HF transformers models under ``tp_plan="auto"`` at TP=2 (Llama, Qwen3, Phi3,
Mixtral) against the one-process model: temporary masks (``MaskTheater``), circuit masks
(``CircuitModel``: masked logits, mask gradients, ablations, L0), layer surgery
(``ModelSurgery``), the logit lens and ``SurgicalTheater``'s modifications. Every test compares
numbers with one process (and that every parameter comes back bit for bit), or asserts the same
clear error on every rank.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from megatron_gpt_cases import (
    BATCH,
    SEQ,
    build_gpt,
    full_tensors,
    gpt_inputs,
    gpt_parallel,
    local_group,
)
from rank_pool import distributed
from test_megatron_configs import build as build_with_spec

TOL = {"rtol": 1e-9, "atol": 1e-11}  # float64; TP changes only the summation order
GATED = {"gated_linear_unit": True, "activation_func": torch.nn.functional.silu}


def _gpt(tp: int, sequence_parallel: bool = False) -> torch.nn.Module:
    """SwiGLU MLP, 2 query groups of 2 heads, q/k layernorm (replicated, per head dim)."""
    if sequence_parallel:  # Megatron's local q/k layernorm refuses sequence parallelism
        return build_gpt(tp, sequence_parallel=tp > 1, num_query_groups=2, **GATED)
    return build_with_spec(tp, spec=dict(qk_layernorm=True), num_query_groups=2,
                           qk_layernorm=True, **GATED)


MEGATRON_GPT = ("decoder.layers", "decoder.final_layernorm", "embedding.word_embeddings",
                "output_layer")


@contextmanager
def _anatomy(class_name: str, parts: tuple):
    """The anatomy table's entry for ``class_name`` is ``parts`` (no registration needed)."""
    from flex_surgery.anatomy import ANATOMIES, Anatomy

    assert ANATOMIES.get(class_name) == Anatomy(*parts), class_name
    yield


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(*gpt_inputs()).detach().clone()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_restored(model, before: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} not restored"


# -- Megatron-core GPTModel ----------------------------------------------------------------------

def _full_masks(whole: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """A different random {0, 1} mask of every named parameter's full shape (same on every
    rank): a mask cut from the wrong rows changes the logits."""
    gen = torch.Generator().manual_seed(11)
    return {n: (torch.rand(whole[n].shape, generator=gen) > 0.3).to(whole[n].dtype)
            for n in names}


MASKED = ["decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc1.bias",
          "decoder.layers.1.self_attention.linear_qkv.weight",
          "decoder.layers.1.self_attention.q_layernorm.weight",
          "decoder.layers.0.mlp.linear_fc2.weight", "embedding.word_embeddings.weight",
          "output_layer.weight"]


@pytest.mark.parametrize("sequence_parallel", [False, True])
@distributed(world_size=2)
def test_megatron_mask_theater_equals_tp1(sequence_parallel):
    """Full-shape masks on the strided SwiGLU fc1 weight and bias, a grouped-query qkv weight,
    a replicated q_layernorm weight, a row-parallel weight, the vocab-parallel embedding and
    head: the TP=1 logits, and every parameter back bit for bit."""
    from flex_surgery.surgery import MaskTheater

    with gpt_parallel(tp=1):
        ref = _gpt(1, sequence_parallel)
        whole = full_tensors(ref)
        masks = _full_masks(whole, [n for n in MASKED if n in whole])
        base_ref = _logits(ref)
        with MaskTheater(ref, masks):
            want = _logits(ref)
    with gpt_parallel(tp=2):
        model = _gpt(2, sequence_parallel)
        assert all(torch.equal(t, whole[n]) for n, t in full_tensors(model).items())
        before = _snapshot(model)
        with MaskTheater(model, masks):
            got = _logits(model)
        _assert_restored(model, before)
        base = _logits(model)
    assert not torch.allclose(want, base_ref)
    torch.testing.assert_close(base, base_ref, **TOL)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("kind", ["noise", "custom"])
@distributed(world_size=2)
def test_megatron_theater_on_qkv_embedding_and_head_equals_tp1(kind):
    """Seeded noise (placed by position in the full parameter) and a full-parameter custom
    edit on every linear of the model, the embedding and the head."""
    from flex_surgery.surgery import SurgicalTheater

    def zero_row_5(t):
        delta = torch.zeros_like(t)
        delta[5] = -t[5]
        return delta

    opts = (dict(modification_type="noise", noise_scale=0.05, seed=4) if kind == "noise" else
            dict(modification_fn=zero_row_5, full_parameter=True))
    layers = ["decoder.layers.*", "embedding.word_embeddings", "output_layer"]
    with gpt_parallel(tp=1):
        ref = _gpt(1)
        with SurgicalTheater(ref, layers=layers, params="all", **opts):
            want = _logits(ref)
        base_ref = _logits(ref)
    with gpt_parallel(tp=2):
        model = _gpt(2)
        before = _snapshot(model)
        with SurgicalTheater(model, layers=layers, params="all", **opts):
            got = _logits(model)
        _assert_restored(model, before)
    assert not torch.allclose(want, base_ref)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("sequence_parallel", [False, True])
@distributed(world_size=2)
def test_megatron_logit_lens_equals_tp1(sequence_parallel):
    """The lens over every block of the GPTModel (residuals [s, b, h], split on the sequence
    under sequence parallelism; vocab-parallel ColumnParallelLinear head)."""
    from flex_surgery import logit_lens

    with _anatomy("GPTModel", MEGATRON_GPT):
        with gpt_parallel(tp=1):
            ref = build_gpt(tp=1, **GATED)
            want = logit_lens(ref, gpt_inputs(), top_k=4, process_group=local_group())
            last = _logits(ref)
        with gpt_parallel(tp=2):
            model = build_gpt(tp=2, sequence_parallel=sequence_parallel, **GATED)
            got = logit_lens(model, gpt_inputs(), top_k=4)
    assert torch.equal(want.tokens[-1, ..., 0], last.transpose(0, 1).argmax(-1))
    assert got.layers == want.layers
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)


@distributed(world_size=2)
def test_megatron_lens_positions_pick_the_sequence():
    """``positions`` index the sequence, which is dim 0 of Megatron's ``[s, b, h]`` residuals
    (it picked batch rows: the dim before the hidden one); the result keeps ``[s, b]``."""
    from flex_surgery import logit_lens

    with _anatomy("GPTModel", MEGATRON_GPT), gpt_parallel(tp=2):
        model = build_gpt(tp=2, **GATED)
        whole = logit_lens(model, gpt_inputs(), top_k=3)
        last = logit_lens(model, gpt_inputs(), top_k=3, positions=[-1, 0])
    assert whole.tokens.shape[1:3] == (SEQ, BATCH)
    assert torch.equal(last.tokens, whole.tokens[:, [-1, 0]])
    torch.testing.assert_close(last.logprobs, whole.logprobs[:, [-1, 0]], rtol=1e-6, atol=1e-6)


@distributed(world_size=2)
def test_megatron_layer_surgery_equals_tp1():
    """delete / permute / replace (by the other block, sharded alike) on the TP=2 model."""
    from flex_surgery import ModelSurgery

    def run(model):
        s = ModelSurgery(model)
        out = []
        with s.delete_layers([0]):
            out.append(_logits(model))
        with s.permute_layers([1, 0]):
            out.append(_logits(model))
        with s.replace_layers([0], [model.decoder.layers[1]]):
            out.append(_logits(model))
        out.append(_logits(model))
        return out

    with _anatomy("GPTModel", MEGATRON_GPT):
        with gpt_parallel(tp=1):
            want = run(_gpt(1))
        with gpt_parallel(tp=2):
            model = _gpt(2)
            before = _snapshot(model)
            got = run(model)
            _assert_restored(model, before)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    assert not torch.allclose(want[0], want[-1])


def _assert_same_circuit_run(got: dict, want: dict, **tol) -> None:
    """What a sharded circuit run gave (:func:`_circuit_run`) against one process's: the same
    L0 statistics and hard masks, every tensor within ``tol``; the ablations did something."""
    problems = []
    for key, value in want.items():
        if key == "l0":
            if got[key] != value:
                problems.append(f"l0: {got[key]} != {value}")
        elif key == "hard":
            problems += [f"hard mask {n} differs" for n, m in value.items()
                         if not torch.equal(got[key][n].to(m.dtype), m)]
        elif not torch.allclose(got[key].to(value.dtype), value, **tol):
            diff = (got[key].to(value.dtype) - value).abs().max().item()
            problems.append(f"{key}: differs by up to {diff:.3g}")
    assert not problems, "\n".join(problems)
    assert not torch.allclose(want["zero_ablate"], want["none"])


MEGATRON_CIRCUIT_TARGETS = ["decoder.layers.0.self_attention.linear_qkv",
                            "decoder.layers.0.self_attention.linear_proj",
                            "decoder.layers.1.mlp.linear_fc1", "decoder.layers.1.mlp.linear_fc2",
                            "output_layer"]


def _megatron_circuit(model, unit: str, group=None):
    from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel

    config = CircuitConfig(mask_hparams=dict(mask_unit=unit, mask_bias=True),
                           target_layers=MEGATRON_CIRCUIT_TARGETS, l0_lambda=0.0, seed=3)
    circuit = CircuitModel(config, model, process_group=group)
    _set_logits(circuit)
    return circuit


def _megatron_circuit_run(circuit) -> dict:
    """As _circuit_run, on a Megatron GPTModel's ``(ids, positions, mask)``."""
    out = {}
    inputs = gpt_inputs()
    circuit.train()
    circuit.temperature = 2.0
    logits = circuit(*inputs)
    ((logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view(logits.shape)
      ).sum() + 1e-3 * circuit.l0_loss()).backward()
    out["train"] = logits.detach().clone()
    for name, layer in circuit._layers.items():
        for pname, mp in layer.params.items():
            out[f"grad {name}.{pname}"] = mp.gather(mp.logits.grad)
    circuit.eval()
    out["l0"] = circuit.compute_l0_statistics()
    for mode in ("none", "zero_ablate", "randomly_sampled", "random_ablate"):
        circuit.set_ablate_mode(mode)
        with torch.no_grad():
            out[mode] = circuit(*inputs).detach().clone()
    circuit.set_ablate_mode("none")
    out["hard"] = {n: m.clone() for n, m in circuit.hard_masks().items()}
    return out


@pytest.mark.parametrize("unit", ["weight", "neuron"])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "gated"])
@distributed(world_size=2, timeout_s=120)
def test_megatron_gpt_circuit_masks_equal_tp1(gated, sequence_parallel, unit):
    """NeuroSurgeon-style circuit masks on a Megatron-core GPTModel at TP=2 (attention's fused
    qkv, the row-parallel projections, the gated fc1 whose halves are split separately, the
    vocab-parallel head; with and without sequence parallelism): the soft-mask logits, every
    mask gradient, L0, the ablations and the hard masks equal the TP=1 twin's (built on every
    rank with a one-rank process group); the model comes back untouched."""
    extra = GATED if gated else {}
    with gpt_parallel(tp=1):
        want = _megatron_circuit_run(_megatron_circuit(build_gpt(tp=1, **extra), unit,
                                                       local_group()))
    with gpt_parallel(tp=2):
        model = build_gpt(tp=2, sequence_parallel=sequence_parallel, **extra)
        before = _snapshot(model)
        par = _megatron_circuit(model, unit)
        got = _megatron_circuit_run(par)
        par.remove_masks()
        _assert_restored(model, before)
    _assert_same_circuit_run(got, want, rtol=1e-9, atol=1e-11)


# -- HF transformers under tp_plan="auto" -------------------------------------------------------

HF_TOL = dict(rtol=1e-7, atol=1e-9)  # float64
LLAMA_LM = ("model.layers", "model.norm", "model.embed_tokens", "lm_head")
HF_ARCHS = {"qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
            "phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM"}
CIRCUIT_TARGETS = {
    "llama": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
              "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj", "lm_head"],
    "qwen3": ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
              "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj", "lm_head"],
    "phi3": ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
             "model.layers.1.mlp.gate_up_proj", "model.layers.1.mlp.down_proj", "lm_head"],
}


def _hf(arch: str, tp: bool, tmp_path=None):
    import test_hf_tp_models as hf

    if arch == "llama":
        import transformers as tf

        cls, config = tf.LlamaForCausalLM, tf.LlamaConfig(**hf._BASE, tie_word_embeddings=False)
        if not tp:
            config._attn_implementation = "eager"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return cls(config).to(torch.float64).eval()
        folder = tmp_path / "tiny-llama"
        if dist.get_rank() == 0:
            _hf("llama", False).save_pretrained(folder)
        dist.barrier()
        return cls.from_pretrained(folder, tp_plan="auto", dtype=torch.float64,
                                   attn_implementation="eager").eval()
    return hf._tensor_parallel(arch, tmp_path) if tp else hf._one_process(arch)


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return _plain(model(input_ids=_ids()).logits).detach().clone()


def _hf_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: _plain(p.detach()).clone() for n, p in model.named_parameters()}


def _assert_hf_restored(model, before) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(_plain(p.detach()), before[n]), f"{n} not restored"


def _set_logits(circuit) -> None:
    """Random full-shape mask logits (the same on every rank and in one process), each rank
    keeping its region: about half the weights masked."""
    for name, layer in sorted(circuit._layers.items()):
        for pname, mp in sorted(layer.params.items()):
            gen = torch.Generator().manual_seed(zlib.crc32(f"{name}.{pname}".encode()))
            full = torch.randn(mp.full_shape, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                mp.logits.copy_(mp.region.take(full).to(mp.logits))


def _circuit_run(circuit) -> dict:
    """Soft-mask logits and the mask gradients of one weighted loss (full shape, gathered
    through each mask's region), hard-mask L0 and logits of every ablation."""
    out = {}
    circuit.train()
    circuit.temperature = 2.0
    logits = _plain(circuit(input_ids=_ids()).logits)
    w = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view(logits.shape)
    ((logits * w).sum() + 1e-3 * circuit.l0_loss()).backward()
    out["train"] = logits.detach().clone()
    for name, layer in circuit._layers.items():
        for pname, mp in layer.params.items():
            grad = mp.logits.grad
            out[f"grad {name}.{pname}"] = mp.gather(grad) if dist.is_initialized() and \
                mp.tp_group is not None else grad.detach().reshape(mp.full_shape).clone()
    circuit.eval()
    out["l0"] = circuit.compute_l0_statistics()
    for mode in ("none", "zero_ablate", "randomly_sampled", "random_ablate"):
        circuit.set_ablate_mode(mode)
        with torch.no_grad():
            out[mode] = _plain(circuit(input_ids=_ids()).logits).detach().clone()
    circuit.set_ablate_mode("none")
    out["hard"] = {n: m.clone() for n, m in circuit.hard_masks().items()}
    return out


@pytest.mark.parametrize("unit", ["weight", "neuron"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@distributed(world_size=2, timeout_s=240)
def test_hf_tp_circuit_equals_one_process(tmp_path, arch, unit):
    """CircuitModel on q/k/qkv, o, gate/up/gate_up, down projections and the LM head under
    tp_plan="auto": soft-masked logits, every mask gradient, L0, every ablation's logits and
    the hard masks equal one process; the model comes back untouched."""
    from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel

    def config():
        return CircuitConfig(mask_hparams=dict(mask_unit=unit, mask_bias=False),
                             target_layers=CIRCUIT_TARGETS[arch], l0_lambda=0.0, seed=3)

    ref = CircuitModel(config(), _hf(arch, False))
    _set_logits(ref)
    want = _circuit_run(ref)
    model = _hf(arch, True, tmp_path)
    before = _hf_snapshot(model)
    par = CircuitModel(config(), model)
    _set_logits(par)
    got = _circuit_run(par)
    par.remove_masks()
    _assert_hf_restored(model, before)
    _assert_same_circuit_run(got, want, **HF_TOL)


@pytest.mark.parametrize("arch", ["qwen3", "phi3", "mixtral"])
@distributed(world_size=2, timeout_s=240)
def test_hf_tp_logit_lens_equals_one_process(tmp_path, arch):
    """The lens at TP=2 (Qwen3's per-head norms, Phi3's fused projections inside the blocks;
    vocab-parallel lm_head; Mixtral's MoE experts, summed over tp as they return) equals the
    one-process lens at every block. (The one-process reference gets a one-rank group: a plain
    model on 2 ranks counts as 2 data-parallel replicas, whose batches the lens concatenates.)"""
    from flex_surgery import logit_lens

    with _anatomy(HF_ARCHS[arch], LLAMA_LM):
        ref = _hf(arch, False)
        want = logit_lens(ref, {"input_ids": _ids()}, top_k=4, process_group=local_group())
        model = _hf(arch, True, tmp_path)
        got = logit_lens(model, {"input_ids": _ids()}, top_k=4)
    assert torch.equal(want.tokens[-1, ..., 0], _hf_logits(ref).argmax(-1))
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)


@distributed(world_size=2, timeout_s=240)
def test_hf_tp_replacing_a_block_by_a_one_process_block_is_refused_everywhere(tmp_path):
    """A plain (one-process) Qwen3 block put in place of a DTensor-TP block would compute on
    whole weights against sharded activations: ShardingMismatchError on every rank."""
    from flex_surgery import ModelSurgery
    from flex_surgery.surgery.model_surgery import ShardingMismatchError

    ref, model = _hf("qwen3", False), _hf("qwen3", True, tmp_path)
    base = _hf_logits(model)
    with _anatomy("Qwen3ForCausalLM", LLAMA_LM):
        with pytest.raises(ShardingMismatchError):
            with ModelSurgery(model).replace_layers([0], [ref.model.layers[0]]):
                pass
    assert torch.equal(_hf_logits(model), base)


@distributed(world_size=2, timeout_s=240)
def test_hf_tp_mixtral_expert_masks_noise_and_layer_surgery_equal_one_process(tmp_path):
    """MaskTheater and seeded noise on the 3-D expert weights (packed_colwise gate_up_proj is
    a _StridedShard), and ModelSurgery's delete / permute / replace."""
    from flex_surgery import ModelSurgery
    from flex_surgery.surgery import MaskTheater, SurgicalTheater

    names = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
             "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
    ref, model = _hf("mixtral", False), _hf("mixtral", True, tmp_path)
    whole = dict(ref.named_parameters())
    masks = _full_masks({n: whole[n].detach() for n in names}, names)

    def run(m):
        out = []
        with MaskTheater(m, masks):
            out.append(_hf_logits(m))
        with SurgicalTheater(m, layers=names, modification_type="noise", noise_scale=0.05,
                             seed=5, params="all"):
            out.append(_hf_logits(m))
        with _anatomy("MixtralForCausalLM", LLAMA_LM):
            s = ModelSurgery(m)
            with s.delete_layers([0]):
                out.append(_hf_logits(m))
            with s.permute_layers([1, 0]):
                out.append(_hf_logits(m))
            with s.replace_layers([1], [m.model.layers[0]]):
                out.append(_hf_logits(m))
        out.append(_hf_logits(m))
        return out

    want = run(ref)
    before = _hf_snapshot(model)
    got = run(model)
    _assert_hf_restored(model, before)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **HF_TOL, msg=lambda m, i=i: f"case {i}: {m}")
        if i < len(want) - 1:
            assert not torch.allclose(w, want[-1])

