"""SurgicalTheater in one process: what each modification does, bit-exact restore in place,
errors, nesting, the validation guard, state_dict and optimizer protection, FlexModel."""

from __future__ import annotations

import io
import math

import pytest
import torch
from test_surgery_support import differing_bytes, raw_state, special_values

from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.surgery import SurgeryError, SurgicalTheater, active_theaters, noise_seed

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def llama_fp32():
    return tiny_hf_model("llama")


def _fresh(dtype=torch.float32, arch="llama"):
    return tiny_hf_model(arch, dtype=dtype)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_scale_multiplies_exactly_the_linear_weights_of_the_target_block():
    m = _fresh()
    before = _weights(m)
    with SurgicalTheater(m, layers=1, modification_type="scale", factor=0.5) as t:
        now = _weights(m)
    linear = {f"model.layers.1.{p}.weight" for p in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(t.modified_names) == linear
    for name, w in before.items():
        expected = w * 0.5 if name in linear else w
        assert torch.equal(now[name], expected), name


def test_disable_zeroes_and_params_all_includes_norms():
    m = _fresh()
    with SurgicalTheater(m, layers="model.layers.0", modification_type="disable", params="all"):
        for name, p in m.named_parameters():
            assert (p == 0).all() == name.startswith("model.layers.0."), name


def test_seeded_noise_is_the_documented_per_parameter_stream():
    m = _fresh()
    w = m.model.layers[0].mlp.up_proj.weight
    orig = w.detach().clone()
    name = "model.layers.0.mlp.up_proj.weight"
    with SurgicalTheater(m, layers=name, modification_type="noise", noise_scale=0.1, seed=7):
        gen = torch.Generator().manual_seed(noise_seed(7, name, 0))
        noise = torch.randn(w.shape, generator=gen) * 0.1
        assert torch.equal(w, orig + noise)
    with SurgicalTheater(m, layers=name, modification_type="noise", seed=7):
        first = w.detach().clone()
    with SurgicalTheater(m, layers=name, modification_type="noise", seed=8):
        assert not torch.equal(w, first)


def test_noise_without_seed_differs_between_contexts_and_leaves_rng_as_after_one_draw():
    m = _fresh()
    w = m.lm_head.weight
    torch.manual_seed(123)
    with SurgicalTheater(m, layers="lm_head", modification_type="noise"):
        a = w.detach().clone()
    with SurgicalTheater(m, layers="lm_head", modification_type="noise"):
        b = w.detach().clone()
    assert not torch.equal(a, b)
    torch.manual_seed(123)
    torch.randint(0, 2**62, (1,))
    torch.randint(0, 2**62, (1,))
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with SurgicalTheater(m, layers="lm_head", modification_type="noise"):
        torch.rand(100)  # validation may consume RNG: it is rolled back
    with SurgicalTheater(m, layers="lm_head", modification_type="noise"):
        pass
    assert torch.equal(torch.rand(3), expected_next)


def test_noise_is_generated_in_blocks_of_rows_from_per_block_generators(monkeypatch):
    import flex_surgery.surgery.modifications as theater

    m = _fresh()
    w = m.lm_head.weight  # 128 x 64
    orig = w.detach().clone()
    monkeypatch.setattr(theater, "NOISE_CHUNK_ELEMENTS", 64 * 7 + 5)  # 7 whole rows per block
    blocks = []
    for k, row0 in enumerate(range(0, 128, 7)):
        gen = torch.Generator().manual_seed(noise_seed(5, "lm_head.weight", k))
        blocks.append(torch.randn((min(7, 128 - row0), 64), generator=gen))
    with SurgicalTheater(m, layers="lm_head", modification_type="noise", seed=5,
                         noise_scale=1.0):
        assert torch.equal(w, orig + torch.cat(blocks))


def test_custom_delta_is_added_and_gets_kwargs():
    m = _fresh()
    orig = m.lm_head.weight.detach().clone()

    def delta(p, k):
        return torch.full_like(p, k)

    with SurgicalTheater(m, layers="lm_head", modification_fn=delta, k=0.25):
        assert torch.equal(m.lm_head.weight, orig + 0.25)
    assert torch.equal(m.lm_head.weight, orig)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backup", ["device", "cpu"])
def test_restore_is_bit_exact_in_place_with_special_values(dtype, backup):
    m = _fresh(dtype)
    special_values(m)
    before = raw_state(m)
    x = example_inputs("llama")
    for kind, kw in [("scale", {"factor": 0.9}), ("noise", {"seed": 3}), ("disable", {}),
                     ("custom", {"modification_fn": lambda p: p * 0.3 - 1e-3})]:
        with SurgicalTheater(m, modification_type=kind, backup=backup, params="all", **kw) as t:
            assert t.stats["modified_bytes"] == sum(p.numel() * p.element_size()
                                                    for p in m.parameters())
            m(**x)
        assert differing_bytes(before, raw_state(m)) == 0, kind


def test_subtracting_would_not_restore_bf16_but_snapshots_do():
    """Why snapshots: the delta round trip loses bits in bf16."""
    m = _fresh(torch.bfloat16)
    w = m.lm_head.weight
    orig = w.detach().clone()
    roundtrip = (w * 0.9 - w * (0.9 - 1.0))  # w + d - d with d = w * (0.9 - 1)
    assert not torch.equal(roundtrip, orig)
    before = raw_state(m)
    for _ in range(5):
        with SurgicalTheater(m, modification_type="scale", factor=0.9):
            pass
    assert differing_bytes(before, raw_state(m)) == 0


def test_exception_and_keyboard_interrupt_inside_restore():
    m = _fresh()
    before = raw_state(m)
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with SurgicalTheater(m, modification_type="noise", seed=0):
                raise exc
        assert differing_bytes(before, raw_state(m)) == 0
        assert active_theaters() == ()


def test_failure_while_entering_rolls_back_what_was_modified():
    m = _fresh()
    before = raw_state(m)
    calls = []

    def fails_on_third(p):
        calls.append(p.shape)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return torch.ones_like(p)

    m.train()
    with pytest.raises(KeyboardInterrupt):
        with SurgicalTheater(m, modification_fn=fails_on_third):
            pytest.fail("body must not run")
    assert len(calls) == 3
    assert differing_bytes(before, raw_state(m)) == 0
    assert m.training and active_theaters() == ()


def test_wrong_delta_shape_is_a_clear_error():
    m = _fresh()
    before = raw_state(m)
    with pytest.raises(ValueError, match="full_parameter=True"):
        with SurgicalTheater(m, layers=0, modification_fn=lambda p: p.sum()):
            pass
    assert differing_bytes(before, raw_state(m)) == 0


def test_nesting_unwinds_lifo_and_misuse_is_an_error():
    m = _fresh()
    before = raw_state(m)
    outer = SurgicalTheater(m, layers=0, modification_type="scale", factor=2.0)
    inner = SurgicalTheater(m, layers=[0, 1], modification_type="noise", seed=1)
    w = m.model.layers[0].mlp.up_proj.weight
    orig = w.detach().clone()
    with outer:
        with pytest.raises(SurgeryError, match="already active"):
            outer.__enter__()
        inner.__enter__()
        with pytest.raises(SurgeryError, match="out of order"):
            outer.__exit__(None, None, None)
        inner.__exit__(None, None, None)
        assert torch.equal(w, orig * 2.0)
    assert differing_bytes(before, raw_state(m)) == 0
    with pytest.raises(SurgeryError, match="not active"):
        outer.__exit__(None, None, None)
    with outer:  # a theater can be used again after it exited
        assert torch.equal(w, orig * 2.0)


def test_targets_by_index_glob_and_name_and_errors_with_suggestions():
    m = _fresh()
    with SurgicalTheater(m, layers=-1, modification_type="scale") as t:
        assert all(n.startswith("model.layers.1.") for n in t.modified_names)
    with SurgicalTheater(m, layers="model.layers.*.mlp", modification_type="scale") as t:
        assert len(t.modified_names) == 6
    with SurgicalTheater(m, layers="model.norm.weight", modification_type="scale") as t:
        assert t.modified_names == ["model.norm.weight"]  # named exactly: always included
    with pytest.raises(ValueError, match="model.layers.0.mlp"):
        SurgicalTheater(m, layers="model.layers.0.mpl", modification_type="scale").__enter__()
    with pytest.raises(IndexError, match="2 blocks"):
        SurgicalTheater(m, layers=5, modification_type="scale").__enter__()
    with pytest.raises(ValueError, match="selects no parameter"):
        SurgicalTheater(m, layers="model.norm", modification_type="scale").__enter__()
    with pytest.raises(ValueError, match="modification_type"):
        SurgicalTheater(m, modification_type="shrink")
    assert active_theaters() == ()


def test_tied_parameters_are_modified_once():
    m = _fresh(arch="gpt2")
    assert m.lm_head.weight is m.transformer.wte.weight
    orig = m.lm_head.weight.detach().clone()
    with SurgicalTheater(m, layers="lm_head", modification_type="scale", factor=0.5,
                         params="weights") as t:
        assert t.modified_names == ["transformer.wte.weight"]
        assert torch.equal(m.transformer.wte.weight, orig * 0.5)


def test_validation_guard_restores_flags_rng_and_grads():
    m = _fresh()
    m.train()
    m.model.norm.eval()
    m.lm_head.weight.requires_grad_(False)
    x = example_inputs("llama")
    m(**x).logits.sum().backward()
    grads = {n: (p.grad, p.grad.clone()) for n, p in m.named_parameters() if p.grad is not None}
    rng = torch.get_rng_state()
    with SurgicalTheater(m, layers=0, modification_type="scale"):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(True)
        torch.rand(10)
        m(**x).logits.sum().backward()  # a backward during validation...
    assert m.training and not m.model.norm.training and m.model.layers[0].training
    assert not m.lm_head.weight.requires_grad and m.model.norm.weight.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in m.named_parameters():  # ...does not reach the training gradients
        if n in grads:
            assert p.grad is grads[n][0] and torch.equal(p.grad, grads[n][1])
        else:
            assert p.grad is None


def test_pure_guard_modifies_nothing():
    m = _fresh()
    before = raw_state(m)
    with SurgicalTheater(m) as t:
        m.train()
        assert t.modified_names == []
    assert not m.training
    assert differing_bytes(before, raw_state(m)) == 0


def test_state_dict_inside_returns_the_original_weights():
    m = _fresh()
    orig = {k: v.clone() for k, v in m.state_dict().items()}
    x = example_inputs("llama")
    with SurgicalTheater(m, modification_type="noise", seed=0, params="all"):
        modified_logits = m(**x).logits
        sd = m.state_dict()
        buf = io.BytesIO()
        torch.save(m.model.layers[0].state_dict(), buf)  # a submodule's state_dict too
        assert torch.equal(m(**x).logits, modified_logits)  # still modified afterwards
    for k, v in orig.items():
        assert torch.equal(sd[k], v), k
    buf.seek(0)
    layer0 = torch.load(buf)
    for k, v in layer0.items():
        assert torch.equal(v, orig[f"model.layers.0.{k}"])


def test_optimizer_step_on_modified_parameters_raises():
    m = _fresh()
    modified = torch.optim.AdamW(m.model.layers[0].parameters())
    untouched = torch.optim.SGD(m.model.layers[1].parameters(), lr=0.1)
    with SurgicalTheater(m, layers=0, modification_type="scale"):
        with pytest.raises(SurgeryError, match="optimizer.step"):
            modified.step()
        untouched.step()  # parameters outside the theater may train
    modified.step()


def test_backup_cpu_keeps_snapshots_on_the_host():
    m = _fresh()
    with SurgicalTheater(m, modification_type="scale", backup="cpu") as t:
        assert all(s.backup.device.type == "cpu" for s in t._snapshots)
        assert t.stats["backup_bytes"] == t.stats["modified_bytes"] > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backup", ["device", "cpu"])
def test_entering_again_reuses_the_snapshot_buffers_and_restores_bit_exactly(dtype, backup):
    """A validation loop enters one theater every N steps: the second entry writes its snapshots
    into the first entry's buffers (same storage), and each exit restores the weights as they
    were at *that* entry -- training between entries included."""
    m = _fresh(dtype)
    special_values(m)
    w = m.lm_head.weight
    t = SurgicalTheater(m, modification_type="scale", backup=backup, params="all")
    buffers = []
    for factor in (0.5, -3.0):
        with torch.no_grad():
            w.add_(1)  # a training step between validations: the snapshot must see it
        before = raw_state(m)
        expected = w.detach().clone() * factor
        t.factor = factor
        with t:
            torch.testing.assert_close(w.detach(), expected, rtol=0, atol=0, equal_nan=True)
            buffers.append([s.backup for s in t._snapshots])
            reused = t.stats["reused_snapshots"]
        assert differing_bytes(before, raw_state(m)) == 0
    assert reused == len(buffers[1]) == len(buffers[0]) > 0
    assert all(a is b and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
               for a, b in zip(buffers[0], buffers[1]))
    assert len({b.untyped_storage().data_ptr() for b in buffers[1]}) == len(buffers[1])

    t.release_snapshots()  # an explicit release: the next entry allocates anew
    with t:
        assert t.stats["reused_snapshots"] == 0
        assert not any(s.backup is b for s, b in zip(t._snapshots, buffers[0]))
    once = SurgicalTheater(m, modification_type="scale", backup=backup, keep_snapshots=False)
    for _ in range(2):
        with once:
            assert once.stats["reused_snapshots"] == 0
    assert once._kept == {}


def test_reused_buffers_follow_the_targets_of_each_entry():
    """A buffer is reused only for the parameter it saved, with its shape and dtype; buffers of
    parameters the next entry does not modify are dropped."""
    m = _fresh()
    before = raw_state(m)
    t = SurgicalTheater(m, layers="lm_head", modification_type="disable")
    with t:
        first = t._snapshots[0].backup
    t.layers = ["lm_head", "model.layers.0"]
    with t:
        assert t.stats["reused_snapshots"] == 1
        by_name = dict(zip(t.modified_names, t._snapshots))
        assert by_name["lm_head.weight"].backup is first
        assert sum(s.backup is first for s in t._snapshots) == 1
    assert differing_bytes(before, raw_state(m)) == 0
    t.layers = "model.layers.1"
    with t:
        assert t.stats["reused_snapshots"] == 0
    assert set(t._kept) == set(t.modified_names)
    assert differing_bytes(before, raw_state(m)) == 0


def test_a_theater_entered_again_sees_replaced_parameters():
    """The targets resolved at one entry are reused at the next only while every parameter is
    the same object on the same storage: a replaced parameter, or reassigned ``.data``, is
    modified (and restored) at the next entry, the old one is left alone."""
    m = _fresh()
    t = SurgicalTheater(m, layers="lm_head", modification_type="scale", factor=0.5)
    with t:
        pass
    old = m.lm_head.weight
    old_values = old.detach().clone()
    m.lm_head.weight = torch.nn.Parameter(torch.randn_like(old))
    new_values = m.lm_head.weight.detach().clone()
    with t:
        assert torch.equal(m.lm_head.weight, new_values * 0.5)
        assert torch.equal(old, old_values)
    assert torch.equal(m.lm_head.weight, new_values)
    m.lm_head.weight.data = torch.randn_like(old)
    data_values = m.lm_head.weight.detach().clone()
    with t:
        assert torch.equal(m.lm_head.weight, data_values * 0.5)
    assert torch.equal(m.lm_head.weight, data_values)
    t.layers = "model.layers.0.mlp.up_proj"  # other arguments: resolved anew
    with t:
        assert t.modified_names == ["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(m.lm_head.weight, data_values)


def test_works_inside_flexmodel_with_hooks_active():
    pytest.importorskip("flex_surgery.hooks.wrapper")
    from flex_surgery.hooks import FlexModel, HookFunction

    m = _fresh()
    ref = _fresh()
    x = example_inputs("llama")
    out: dict = {}
    flex = FlexModel(m, out)
    flex.register_forward_hook(HookFunction("model.layers.0.mlp", expected_shape=None))
    before = raw_state(m)
    with SurgicalTheater(flex, layers=0, modification_type="noise", seed=4) as t:
        assert t.modified_names[0].startswith("model.layers.0.")  # FlexModel's prefix peeled
        got = flex(**x).logits
    with SurgicalTheater(ref, layers=0, modification_type="noise", seed=4):
        want = ref(**x).logits
        want_mlp = ref.model.layers[0].mlp(ref.model.embed_tokens(x["input_ids"]))
    assert torch.equal(got, want)
    assert out["model.layers.0.mlp"][0].shape == want_mlp.shape
    assert differing_bytes(before, raw_state(m)) == 0


def _train(validate: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = tiny_hf_model("llama")
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    data = [example_inputs("llama", seed=s)["input_ids"] for s in range(4)]
    for step in range(20):
        ids = data[step % 4]
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        if validate and step % 5 == 4:  # every 5 steps, a different modification
            kind = ("noise", "scale", "disable", "custom")[step // 5]
            fn = (lambda p: torch.randn_like(p)) if kind == "custom" else None
            with SurgicalTheater(m, modification_type=kind, modification_fn=fn,
                                 params="all"), torch.no_grad():
                m.eval()
                val = m(input_ids=data[0], labels=data[0]).loss
                assert math.isfinite(val.item())
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_training_with_validation_ends_with_the_same_weights():
    plain, validated = _train(False), _train(True)
    for name, w in plain.items():
        assert torch.equal(w.view(torch.uint8), validated[name].view(torch.uint8)), name


def test_ctrl_c_during_the_restore_is_delivered_after_it(monkeypatch):
    import os
    import signal

    from flex_surgery.surgery.snapshot import Snapshot

    m = _fresh()
    before = raw_state(m)
    restore = Snapshot.restore
    sent = []

    def interrupted_restore(self):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the restore loop
        restore(self)

    monkeypatch.setattr(Snapshot, "restore", interrupted_restore)
    with pytest.raises(KeyboardInterrupt):
        with SurgicalTheater(m, modification_type="scale", params="all"):
            pass
    assert sent and differing_bytes(before, raw_state(m)) == 0
    assert active_theaters() == ()


def test_mask_theater_multiplies_by_full_shape_masks_and_restores():
    from flex_surgery.surgery import MaskTheater, continuous_mask, hard_mask

    m = _fresh(torch.bfloat16)
    before = raw_state(m)
    w = m.model.layers[0].mlp.up_proj.weight
    orig = w.detach().clone()
    logits = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    soft = continuous_mask(logits, temperature=0.5)
    with MaskTheater(m, {"model.layers.0.mlp.up_proj.weight": soft,
                         "model.norm.weight": hard_mask(torch.randn(64))}) as t:
        assert torch.equal(w, orig * soft.to(torch.bfloat16))
        assert sorted(t.modified_names) == ["model.layers.0.mlp.up_proj.weight",
                                            "model.norm.weight"]
    assert differing_bytes(before, raw_state(m)) == 0
    with pytest.raises(ValueError, match="full shape"):
        MaskTheater(m, {"lm_head.weight": torch.ones(3)}).__enter__()
    with pytest.raises(ValueError, match="parameter names"):
        MaskTheater(m, {"model.norm": torch.ones(64)}).__enter__()
    assert differing_bytes(before, raw_state(m)) == 0
