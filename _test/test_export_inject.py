"""inject_weights on programs the user exported with plain ``torch.export.export``: after
injection ``program.module()`` equals the eager model with those weights at every exported
sequence length, the user's eager model never changes, and bad weights are rejected by name with
the program left exactly as it was."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

from flex_surgery.export import (
    ExportedModel,
    WeightMismatchError,
    inject_weights,
    owns_weights,
)
from flex_surgery.models import example_inputs, tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent
DYNAMIC_LENGTHS = (2, 8, 13, 64)


def export_plain(model: nn.Module, dynamic: bool, seq: int = 8) -> torch.export.ExportedProgram:
    ids = example_inputs("gpt2", seq=seq)["input_ids"]
    shapes = {"input_ids": {1: Dim("seq", min=2, max=64)}} if dynamic else None
    return torch.export.export(model, (), kwargs={"input_ids": ids}, dynamic_shapes=shapes,
                               strict=False)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def bits(model_or_state) -> dict[str, torch.Tensor]:
    state = (model_or_state.state_dict() if isinstance(model_or_state, nn.Module)
             else model_or_state)
    return {k: v.detach().clone().contiguous().view(torch.uint8) for k, v in state.items()}


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def arch(request):
    return request.param


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_injected_program_equals_eager_at_every_length(arch, dynamic):
    eager = tiny_hf_model(arch, seed=0)
    other = tiny_hf_model(arch, seed=1)
    program = export_plain(eager, dynamic)
    eager_before = bits(eager)
    assert not owns_weights(program)

    assert inject_weights(program, other.state_dict()) is program
    assert owns_weights(program)
    assert_same_bits(bits(eager), eager_before)  # the user's model did not change
    runner = program.module()
    lengths = DYNAMIC_LENGTHS if dynamic else (8,)
    for seq in lengths:
        ids = example_inputs(arch, seq=seq, seed=seq)["input_ids"]
        assert torch.equal(runner(input_ids=ids).logits, logits(other, ids)), seq
        assert not torch.equal(logits(eager, ids), logits(other, ids))

    # back to the first weights: the same program, the same lengths
    inject_weights(program, eager.state_dict())
    for seq in lengths:
        ids = example_inputs(arch, seq=seq, seed=seq)["input_ids"]
        assert torch.equal(program.module()(input_ids=ids).logits, logits(eager, ids)), seq


def test_program_is_detached_once_then_written_in_place(tmp_path):
    eager, other = tiny_hf_model("gpt2", seed=0), tiny_hf_model("gpt2", seed=1)
    program = export_plain(eager, dynamic=True)
    assert program.state_dict["lm_head.weight"] is eager.lm_head.weight  # torch.export aliases

    inject_weights(program, other.state_dict())
    state = program.state_dict
    assert all(t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
               for t, p in zip(state.values(), eager.state_dict().values()))
    assert state["lm_head.weight"] is state["transformer.wte.weight"]  # still tied
    assert isinstance(state["lm_head.weight"], nn.Parameter)
    ptrs = {k: v.data_ptr() for k, v in state.items()}
    runner = program.module()  # built after the first injection: sees later ones too

    ids = example_inputs("gpt2", seq=13)["input_ids"]
    with torch.no_grad():  # training the eager model does not leak into the program
        eager.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    assert torch.equal(runner(input_ids=ids).logits, logits(other, ids))

    inject_weights(program, eager.state_dict())
    assert {k: v.data_ptr() for k, v in program.state_dict.items()} == ptrs  # in place
    assert torch.equal(runner(input_ids=ids).logits, logits(eager, ids))

    path = tmp_path / "injected.pt2"  # the injected weights are what torch.export.save writes
    torch.export.save(program, path)
    assert torch.equal(torch.export.load(path).module()(input_ids=ids).logits, logits(eager, ids))


def test_one_name_of_a_tied_group_fills_it():
    eager, other = tiny_hf_model("gpt2", seed=0), tiny_hf_model("gpt2", seed=1)
    program = export_plain(eager, dynamic=False)
    weights = {k: v for k, v in other.state_dict().items() if k != "lm_head.weight"}
    inject_weights(program, weights)
    ids = example_inputs("gpt2")["input_ids"]
    assert torch.equal(program.module()(input_ids=ids).logits, logits(other, ids))


def test_strict_false_keeps_missing_weights_and_still_detaches():
    eager, other = tiny_hf_model("gpt2", seed=0), tiny_hf_model("gpt2", seed=1)
    program = export_plain(eager, dynamic=False)
    ids = example_inputs("gpt2")["input_ids"]
    before = logits(eager, ids)
    new_fc = other.transformer.h[0].mlp.c_fc.weight
    inject_weights(program, {"transformer.h.0.mlp.c_fc.weight": new_fc}, strict=False)
    with torch.no_grad():
        eager.transformer.h[0].mlp.c_fc.weight.copy_(new_fc)
        expected = logits(eager, ids)
        eager.transformer.h[1].attn.c_proj.weight.zero_()  # must not reach the program
    assert not torch.equal(expected, before)
    assert torch.equal(program.module()(input_ids=ids).logits, expected)


def test_persistent_buffers_are_injected():
    eager = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).eval()
    other = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        other[1].running_mean.normal_()
        other[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 4)
    program = torch.export.export(eager, (x,), dynamic_shapes=({0: Dim("batch")},))
    assert "1.running_mean" in program.graph_signature.buffers
    inject_weights(program, other.state_dict())
    with torch.no_grad():
        for rows in (3, 5):
            xs = torch.randn(rows, 4)
            assert torch.equal(program.module()(xs), other(xs))


# -- bad input: named, and nothing written -------------------------------------------------------
def _corrupt(state: dict, how: str) -> tuple[dict, str]:
    state = dict(state)
    name = "transformer.h.1.attn.c_attn.weight"
    if how == "missing":
        del state[name]
    elif how == "unexpected":
        state["transformer.h.1.attn.c_atn.weight"] = state.pop(name)
    elif how == "shape":
        state[name] = state[name][:, :-1]
    elif how == "dtype":
        state[name] = state[name].double()
    return state, name


@pytest.mark.parametrize("already_owned", [False, True], ids=["fresh", "owned"])
def test_every_bad_key_is_named_and_nothing_is_written(already_owned):
    eager, other = tiny_hf_model("gpt2", seed=0), tiny_hf_model("gpt2", seed=1)
    program = export_plain(eager, dynamic=False)
    if already_owned:
        inject_weights(program, eager.state_dict())
    entries = dict(program.state_dict)
    before = bits(program.state_dict)
    for how in ("missing", "unexpected", "shape", "dtype"):
        weights, name = _corrupt(other.state_dict(), how)
        with pytest.raises(WeightMismatchError, match=how) as err:
            inject_weights(program, weights)
        assert repr(name) in str(err.value)
        assert owns_weights(program) == already_owned
        assert all(program.state_dict[k] is entries[k] for k in entries)  # same tensors
        assert_same_bits(bits(program.state_dict), before)  # same bits


def test_weights_of_another_architecture():
    program = export_plain(tiny_hf_model("gpt2"), dynamic=False)
    with pytest.raises(WeightMismatchError, match="another architecture"):
        inject_weights(program, tiny_hf_model("llama").state_dict())
    assert not owns_weights(program)


def test_non_persistent_buffer_is_named_as_a_constant():
    eager = tiny_hf_model("llama")
    program = export_plain(eager, dynamic=False)
    weights = dict(eager.state_dict())
    weights["model.rotary_emb.inv_freq"] = eager.model.rotary_emb.inv_freq
    with pytest.raises(WeightMismatchError, match="constants fixed at export"):
        inject_weights(program, weights)


def test_program_without_weights_and_other_objects():
    class Double(nn.Module):
        def forward(self, x):
            return x * 2

    program = torch.export.export(Double(), (torch.randn(2),))
    with pytest.raises(ValueError, match="not exported from an nn.Module with weights"):
        inject_weights(program, {})
    with pytest.raises(TypeError, match="ExportedProgram"):
        inject_weights(Double(), {})
    with pytest.raises(TypeError, match="mapping"):
        inject_weights(export_plain(tiny_hf_model("gpt2"), dynamic=False), [1, 2])


# -- ExportedModel is built on it ----------------------------------------------------------------
def test_exported_model_wrapping_a_plain_program_leaves_eager_model_alone():
    eager, other = tiny_hf_model("gpt2", seed=0), tiny_hf_model("gpt2", seed=1)
    before = bits(eager)
    exported = ExportedModel(export_plain(eager, dynamic=True))
    exported.inject(other)
    assert_same_bits(bits(eager), before)
    ids = example_inputs("gpt2", seq=21)["input_ids"]
    assert torch.equal(exported(input_ids=ids).logits, logits(other, ids))


def test_inject_weights_into_an_exported_models_program_reaches_it():
    eager, other = tiny_hf_model("gpt2", seed=0), tiny_hf_model("gpt2", seed=1)
    ids = example_inputs("gpt2")["input_ids"]
    exported = ExportedModel.export(eager, example_kwargs={"input_ids": ids})
    assert owns_weights(exported.program)  # a private copy: written in place from the start
    inject_weights(exported.program, other.state_dict(), prefix="module.")
    assert torch.equal(exported(input_ids=ids), logits(other, ids))


def test_docs_example_runs():
    page = (ROOT / "docs" / "export.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", page, re.S)
                if "inject_weights(program" in b]
    exec(compile(block, "docs/export.md", "exec"), {"__name__": "docs_example"})


# -- the continual-learning example, reduced -------------------------------------------------------
def test_continual_learning_example_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("continual_learning",
                                                  ROOT / "examples" / "continual_learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("continual_learning", module)
    spec.loader.exec_module(module)
    result = module.main(epochs=2, samples=256, out=tmp_path / "forgetting.png")
    assert (tmp_path / "forgetting.png").stat().st_size > 0
    assert result["injections"] == 2 * 2 * 2  # epochs x tasks x (plain, EWC)
    for run in ("plain", "ewc"):
        accuracy = result[run]["task_a_accuracy"]
        assert len(accuracy) == 4 and all(0.0 <= a <= 1.0 for a in accuracy)
    assert "forgetting on task A" in capsys.readouterr().out


def test_weights_blocks_reuse_their_snapshot_buffers_and_restore_bit_exactly():
    """A loop of ``weights()`` blocks writes its snapshots into the previous block's buffers
    (same storage), each block restoring the weights it found -- injections between blocks
    included; a nested block gets buffers of its own; release_snapshots() frees them."""
    eager = tiny_hf_model("gpt2", seed=0)
    ids = example_inputs("gpt2", seq=8)["input_ids"]
    exported = ExportedModel.export(eager, example_kwargs={"input_ids": ids})
    others = [tiny_hf_model("gpt2", seed=s).state_dict() for s in (1, 2, 3)]
    buffers = []
    for current, other in ((others[0], others[1]), (others[2], others[1])):
        exported.inject(current)
        before = {k: v.clone() for k, v in exported.state_dict().items()}
        with exported.weights(other):
            assert torch.equal(exported.state_dict()["lm_head.weight"], other["lm_head.weight"])
            with exported.weights(current):  # nested: its own buffers, not the outer block's
                pass
        buffers.append(dict(exported._kept))
        after = exported.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    assert buffers[0].keys() == buffers[1].keys() and buffers[0]
    assert all(buffers[0][k] is buffers[1][k] for k in buffers[0])
    assert all(buffers[0][k].untyped_storage().data_ptr()
               == buffers[1][k].untyped_storage().data_ptr() for k in buffers[0])
    exported.release_snapshots()
    assert exported._kept == {}


def test_injecting_values_that_alias_the_programs_own_weights_swaps_them():
    """ExportedModel.state_dict() returns live views of the program's tensors. A swap of two
    blocks' weights built from those views -- {h.0.w: sd[h.1.w], h.1.w: sd[h.0.w]} -- was copied
    slot by slot in place: h.1 was filled from h.0's tensor after h.0 had been overwritten, so
    both held h.1's old weight. Values that share memory with the program are now read first,
    in a ``weights()`` block and by ``inject`` alike."""
    from flex_surgery.export import ExportedModel
    from flex_surgery.models import example_inputs, tiny_hf_model

    model = tiny_hf_model("gpt2", seed=0)
    ids = example_inputs("gpt2")["input_ids"]
    exported = ExportedModel.export(model, example_kwargs={"input_ids": ids})
    a, b = "transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"
    live = exported.state_dict()
    old_a, old_b = live[a].clone(), live[b].clone()
    assert not torch.equal(old_a, old_b)

    with exported.weights({a: live[b], b: live[a]}, strict=False):
        now = exported.state_dict()
        swapped_in_block = torch.equal(now[a], old_b) and torch.equal(now[b], old_a)
    exported.inject({a: live[b], b: live[a]}, strict=False)
    now = exported.state_dict()
    assert torch.equal(now[a], old_b)
    assert torch.equal(now[b], old_a), (
        "block 1 did not receive block 0's old weight: it was copied from block 0's tensor "
        f"after block 0 had been overwritten (now equal to its own old value: "
        f"{torch.equal(now[b], old_b)})")
    assert swapped_in_block


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tied_weights_are_written_and_read_back_under_each_name(tmp_path, suffix):
    """full_weights of a tied model hands out lm_head.weight and the embedding as one tensor;
    safetensors refuses shared memory, so the file gets one copy per name, and injecting what is
    read back reproduces the model."""
    from flex_surgery.export import full_weights, load_weight_file, save_weight_file

    model = tiny_hf_model("gpt2", seed=1)
    weights = full_weights(model)
    assert weights["lm_head.weight"].data_ptr() == weights["transformer.wte.weight"].data_ptr()
    path = tmp_path / f"tied{suffix}"
    save_weight_file(weights, path)
    back = load_weight_file(path)
    assert back.keys() == weights.keys()
    assert all(torch.equal(back[k], v) for k, v in weights.items())
    program = export_plain(tiny_hf_model("gpt2", seed=0), dynamic=False)
    inject_weights(program, back)
    ids = example_inputs("gpt2")["input_ids"]
    assert torch.equal(program.module()(input_ids=ids).logits, logits(model, ids))
