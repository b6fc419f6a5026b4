"""ExportedModel: the exported program equals the eager model before and after weights are
injected, owns its weights (no aliasing either way), restores swapped weights bit-exactly and
rejects weights that do not fit -- leaving itself untouched."""

from __future__ import annotations

import zipfile

import pytest
import torch
from torch.export import Dim

from flex_surgery.export import ExportedModel, WeightMismatchError, live_weights
from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.surgery import SurgicalTheater

ARCHS = ("gpt2", "llama")


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    """One export per architecture for the whole module; tests restore what they inject."""
    arch = request.param
    eager = tiny_hf_model(arch, seed=0)
    ids = example_inputs(arch)["input_ids"]
    exported = ExportedModel.export(eager, example_kwargs={"input_ids": ids},
                                    dynamic_shapes={"input_ids": {1: Dim("seq", min=2, max=64)}})
    other = tiny_hf_model(arch, seed=1)
    return {"arch": arch, "eager": eager, "other": other, "exported": exported, "ids": ids}


@pytest.fixture
def restored(case):
    """Yield the case; afterwards put the eager model's weights back into the program."""
    yield case
    case["exported"].inject(case["eager"])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def run(exported, ids):
    with torch.no_grad():
        return exported(input_ids=ids)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t``: equal bits, not merely equal values (-0.0, NaN payloads)."""
    return t.detach().contiguous().view(torch.uint8)


def snapshot(exported) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in exported.state_dict().items()}


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(bits(a[k]), bits(b[k])), k


# -- equivalence ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seq", [8, 13])
def test_exported_equals_eager(case, seq):
    ids = example_inputs(case["arch"], seq=seq, seed=seq)["input_ids"]
    assert torch.equal(run(case["exported"], ids), logits(case["eager"], ids))


def test_injected_weights_equal_eager_with_those_weights(restored):
    exported, ids = restored["exported"], restored["ids"]
    before = run(exported, ids)
    written = exported.inject(restored["other"])
    assert len(written) == len(exported.layout.slots)
    after = run(exported, ids)
    assert not torch.equal(after, before)
    assert torch.equal(after, logits(restored["other"], ids))
    longer = example_inputs(restored["arch"], seq=21, seed=3)["input_ids"]
    assert torch.equal(run(exported, longer), logits(restored["other"], longer))


def test_inject_through_a_flexmodel_wrapper(restored):
    from flex_surgery.hooks import FlexModel

    exported, ids = restored["exported"], restored["ids"]
    exported.inject(FlexModel(restored["other"], output_dict={}))
    assert torch.equal(run(exported, ids), logits(restored["other"], ids))


def test_inject_from_state_dict_and_back(restored):
    exported, ids = restored["exported"], restored["ids"]
    exported.inject(restored["other"].state_dict())
    exported.inject(dict(restored["eager"].state_dict()))
    assert torch.equal(run(exported, ids), logits(restored["eager"], ids))


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)  # tied weights
def test_inject_from_another_exported_model(restored):
    exported, ids = restored["exported"], restored["ids"]
    other_program = ExportedModel.export(restored["other"], example_kwargs={"input_ids": ids})
    exported.inject(other_program)
    assert torch.equal(run(exported, ids), logits(restored["other"], ids))


# -- ownership: no aliasing in either direction ---------------------------------------------------
def test_program_shares_no_storage_with_eager_model(case):
    eager_ptrs = {p.untyped_storage().data_ptr() for p in case["eager"].state_dict().values()}
    program_ptrs = {t.untyped_storage().data_ptr() for t in case["exported"].state_dict().values()}
    assert not eager_ptrs & program_ptrs


def test_editing_eager_model_leaves_program_alone(case):
    exported, eager, ids = case["exported"], case["eager"], case["ids"]
    reference = run(exported, ids)
    param = next(eager.parameters())
    saved = param.detach().clone()
    with torch.no_grad():
        param.mul_(2.0)
    try:
        assert not torch.equal(logits(eager, ids), reference)
        assert torch.equal(run(exported, ids), reference)
    finally:
        with torch.no_grad():
            param.copy_(saved)


def test_injecting_leaves_eager_model_alone(restored):
    eager = restored["eager"]
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    restored["exported"].inject(restored["other"])
    assert_bit_equal(dict(eager.state_dict()), before)


# -- temporary swaps -----------------------------------------------------------------------------
def test_weights_context_swaps_and_restores_bit_exactly(case):
    exported, ids = case["exported"], case["ids"]
    before_state, before_out = snapshot(exported), run(exported, ids)
    with exported.weights(case["other"]) as swapped:
        assert swapped is exported
        assert torch.equal(run(exported, ids), logits(case["other"], ids))
    assert_bit_equal(snapshot(exported), before_state)
    assert torch.equal(run(exported, ids), before_out)


def test_weights_context_restores_when_block_raises_and_nests(case):
    exported, ids = case["exported"], case["ids"]
    before_state = snapshot(exported)
    third = tiny_hf_model(case["arch"], seed=2)
    with pytest.raises(RuntimeError, match="inside"):
        with exported.weights(case["other"]):
            with exported.weights(third):
                assert torch.equal(run(exported, ids), logits(third, ids))
            assert torch.equal(run(exported, ids), logits(case["other"], ids))
            raise RuntimeError("inside")
    assert_bit_equal(snapshot(exported), before_state)


def test_partial_swap_touches_only_named_weights(case):
    exported = case["exported"]
    before_state = snapshot(exported)
    name = exported.names[-1]
    replacement = torch.full_like(before_state[name], 0.5)
    with exported.weights({name: replacement}, strict=False):
        now = exported.state_dict()
        assert torch.equal(now[name], replacement)
        for k in before_state:
            if k != name:
                assert torch.equal(bits(now[k]), bits(before_state[k])), k
    assert_bit_equal(snapshot(exported), before_state)


# -- tied weights --------------------------------------------------------------------------------
def test_tied_weights_are_one_slot(case):
    exported = case["exported"]
    assert f"{len(exported.layout.slots)} weight tensors" in repr(exported)
    if case["arch"] == "gpt2":
        assert exported.tied == [("transformer.wte.weight", "lm_head.weight")]
    else:  # the tiny llama unties its embeddings
        assert exported.tied == []


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)
def test_one_name_of_a_tied_group_fills_it(restored):
    exported, ids = restored["exported"], restored["ids"]
    sd = dict(restored["other"].state_dict())
    del sd["lm_head.weight"]
    exported.inject(sd)
    assert torch.equal(exported.state_dict()["lm_head.weight"], sd["transformer.wte.weight"])
    assert torch.equal(run(exported, ids), logits(restored["other"], ids))


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)
def test_disagreeing_tied_copies_are_rejected(case):
    sd = dict(case["other"].state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"].clone() + 1.0
    with pytest.raises(WeightMismatchError, match="tied weights disagree.*lm_head.weight"):
        case["exported"].inject(sd)
    sd["lm_head.weight"] = sd["lm_head.weight"][:-1]
    with pytest.raises(WeightMismatchError, match="shape mismatch for 'lm_head.weight'"):
        case["exported"].inject(sd)


# -- errors: clear, complete, and nothing written --------------------------------------------------
def _expect_rejected(exported, weights, pattern: str, **kw):
    before = snapshot(exported)
    with pytest.raises(WeightMismatchError, match=pattern):
        exported.inject(weights, **kw)
    assert_bit_equal(snapshot(exported), before)


def test_missing_key_is_named(case):
    sd = dict(case["other"].state_dict())
    victim = case["exported"].names[3]
    del sd[victim]
    _expect_rejected(case["exported"], sd, rf"missing key\(s\): '{victim}'")


def test_unexpected_key_gets_a_suggestion(case):
    sd = dict(case["other"].state_dict())
    name = case["exported"].names[2]
    sd[name + "s"] = sd.pop(name)
    _expect_rejected(case["exported"], sd, rf"unexpected key.*did you mean '{name}'", strict=False)


def test_prefix_mistake_is_diagnosed(case):
    sd = {"base." + k: v for k, v in case["other"].state_dict().items()}
    _expect_rejected(case["exported"], sd, "with the prefix 'base.' removed")


def test_shape_and_dtype_mismatches_name_their_keys(case):
    sd = dict(case["other"].state_dict())
    names = [s.names[0] for s in case["exported"].layout.slots if len(s.names) == 1]
    sd[names[1]] = sd[names[1]][..., :-1]
    sd[names[2]] = sd[names[2]].double()
    sd[names[4]] = "not a tensor"
    with pytest.raises(WeightMismatchError) as err:
        case["exported"].inject(sd)
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith(f"shape mismatch for '{names[1]}'")
    assert problems[1].startswith(f"dtype mismatch for '{names[2]}'")
    assert problems[2].startswith(f"'{names[4]}' is a str")


def test_unsupported_source_type(case):
    with pytest.raises(TypeError, match="cannot inject"):
        case["exported"].inject([1, 2, 3])


# -- files: program and weights travel separately ------------------------------------------------
def test_save_load_program_then_inject_weight_files(case, tmp_path):
    exported, ids = case["exported"], case["ids"]
    exported.save(tmp_path / "model.pt2")
    with exported.weights(case["other"]):
        exported.save_weights(tmp_path / "other.safetensors")
    exported.save_weights(tmp_path / "eager.pt")
    loaded = ExportedModel.load(tmp_path / "model.pt2")
    assert loaded.tied == exported.tied
    assert torch.equal(run(loaded, ids), logits(case["eager"], ids))
    loaded.inject(tmp_path / "other.safetensors")
    assert torch.equal(run(loaded, ids), logits(case["other"], ids))
    assert torch.equal(run(exported, ids), logits(case["eager"], ids))
    loaded.inject(str(tmp_path / "eager.pt"))
    assert torch.equal(run(loaded, ids), logits(case["eager"], ids))


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)
def test_load_rejects_plain_torch_export_files(case, tmp_path):
    path = tmp_path / "plain.pt2"
    torch.export.save(case["exported"].program, path)
    with pytest.raises(ValueError, match="not written by ExportedModel.save"):
        ExportedModel.load(path)
    assert torch.equal(run(ExportedModel(torch.export.load(path), prefix="module."), case["ids"]),
                       logits(case["eager"], case["ids"]))


def test_missing_weight_file(case, tmp_path):
    with pytest.raises(FileNotFoundError, match="no weight file"):
        case["exported"].inject(tmp_path / "absent.safetensors")


# -- surgery: the program computes what the eager model under surgery computes --------------
def test_live_weights_are_the_state_dict_outside_surgery(case):
    live, sd = live_weights(case["eager"]), case["eager"].state_dict()
    assert live.keys() == sd.keys()
    assert all(live[k].data_ptr() == sd[k].data_ptr() for k in sd)


def test_swap_in_surgically_modified_weights(case):
    exported, eager, ids = case["exported"], case["eager"], case["ids"]
    before_state, reference = snapshot(exported), run(exported, ids)
    with SurgicalTheater(eager, layers=[0], modification_type="scale", factor=0.5):
        modified = logits(eager, ids)
        assert not torch.equal(modified, reference)
        with exported.weights(eager):
            assert torch.equal(run(exported, ids), modified)
        assert torch.equal(run(exported, ids), reference)
    assert_bit_equal(snapshot(exported), before_state)
    assert torch.equal(logits(eager, ids), reference)


def test_inject_bakes_surgery_into_the_program(restored):
    exported, eager, ids = restored["exported"], restored["eager"], restored["ids"]
    with SurgicalTheater(eager, layers="*.mlp*", modification_type="noise", noise_scale=0.1,
                         seed=7):
        modified = logits(eager, ids)
        exported.inject(eager)
    assert not torch.equal(logits(eager, ids), modified)  # the theater restored the eager model
    assert torch.equal(run(exported, ids), modified)  # the program keeps the surgery


# -- a plain module: positional inputs, whole outputs, buffers ----------------------------------
class TiedWithBuffers(torch.nn.Module):
    """Tied input/output weights, a persistent buffer (a checkpoint carries it) and a
    non-persistent one (fixed at export, not injectable)."""

    def __init__(self, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(10, 4, generator=gen))
        self.proj = torch.nn.Linear(4, 4)
        torch.nn.init.normal_(self.proj.weight, generator=gen)
        self.register_buffer("shift", torch.randn(4, generator=gen))
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)
        self.unembed = torch.nn.Linear(4, 10, bias=False)
        self.unembed.weight = self.embed

    def forward(self, x, y):
        h = self.proj(x @ self.embed + self.shift) * self.scale
        return self.unembed(h), h.sum() + y


def test_plain_module_whole_output_and_buffers(tmp_path):
    model, other = TiedWithBuffers(0), TiedWithBuffers(1)
    x, y = torch.randn(3, 10), torch.tensor(1.0)
    exported = ExportedModel.export(model, example_args=(x, y), output=None)
    assert exported.tied == [("embed", "unembed.weight")]
    assert "shift" in exported.names and "scale" not in exported.names
    assert exported.name_map()["proj.weight"] == "proj.weight"
    for got, want in zip(exported(x, y), model(x, y)):
        assert torch.equal(got, want)
    exported.inject(other)
    for got, want in zip(exported(x, y), other(x, y)):
        assert torch.equal(got, want)
    selected = ExportedModel.export(model, example_args=(x, y), output=1)
    assert selected.name_map()["proj.weight"] == "module.proj.weight"
    assert torch.equal(selected(x, y), model(x, y)[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_program_takes_a_cpu_checkpoint():
    eager = tiny_hf_model("llama", seed=0).cuda()
    other = tiny_hf_model("llama", seed=1)
    ids = example_inputs("llama")["input_ids"].cuda()
    exported = ExportedModel.export(eager, example_kwargs={"input_ids": ids})
    before = snapshot(exported)
    with exported.weights(other.state_dict()):  # CPU tensors into the CUDA program
        swapped = run(exported, ids)
    assert_bit_equal(snapshot(exported), before)
    torch.testing.assert_close(swapped, logits(other.cuda(), ids), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["gpt2"], indirect=True)  # tied weights
def test_weightless_program_file_needs_and_takes_weights(case, tmp_path):
    exported, ids = case["exported"], case["ids"]
    exported.save(tmp_path / "graph.pt2", weights=False)
    archive = zipfile.ZipFile(tmp_path / "graph.pt2").infolist()
    assert sum(e.file_size for e in archive if "/data/weights/weight_" in e.filename) == 0
    with pytest.raises(ValueError, match="holds no weights"):
        ExportedModel.load(tmp_path / "graph.pt2")
    with pytest.raises(WeightMismatchError, match="missing key"):
        ExportedModel.load(tmp_path / "graph.pt2", weights={})
    loaded = ExportedModel.load(tmp_path / "graph.pt2", weights=case["other"])
    assert loaded.tied == exported.tied
    assert torch.equal(run(loaded, ids), logits(case["other"], ids))


def test_swap_restores_special_values_bit_for_bit():
    model = TiedWithBuffers(0)
    x, y = torch.randn(3, 10), torch.tensor(1.0)
    exported = ExportedModel.export(model, example_args=(x, y), output=None)
    weird = torch.tensor([-0.0, float("inf"), float("-inf"), 1e-45])  # -0, infinities, subnormal
    nan_payload = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)
    with torch.no_grad():
        exported.state_dict()["shift"].copy_(weird)
        exported.state_dict()["proj.bias"][:1].copy_(nan_payload)
    before = snapshot(exported)
    for _ in range(3):
        with exported.weights(TiedWithBuffers(1)):
            pass
    assert_bit_equal(snapshot(exported), before)
