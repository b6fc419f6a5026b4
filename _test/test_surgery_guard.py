"""The checkpoint guard and restoration under faults, in one process: a state_dict() that raises
inside a theater leaves the weights modified while inside, restored bit-exactly on exit, and the
guard working for the next call; a restore that fails part-way keeps its snapshots and can be
retried; nesting unwinds LIFO; an optimizer step inside raises; no silent casts; one noise
generator rule."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from parallel_cases import llama_tp_plan
from rank_pool import distributed
from test_surgery_support import differing_bytes, raw_state, special_values

from flex_surgery.models import example_inputs, tiny_hf_model
from flex_surgery.surgery import RestoreError, SurgeryError, SurgicalTheater, active_theaters
from flex_surgery.surgery.checkpoint_guard import ORIGINAL_MARK


class _CheckpointHookFailed(Exception):
    pass


def _llama(dtype=torch.float32, special=True):
    """A tiny Llama; with ``special``, holding -0.0, infinities and NaN payloads (for byte
    checks; the logits are then NaN)."""
    m = tiny_hf_model("llama", dtype=dtype)
    if special:
        special_values(m)
    return m


def _original_state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_bits_equal(sd, want):
    assert sd.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(sd[k].view(torch.uint8), v.view(torch.uint8)), k


def _failing_post_hook(module, state_dict, prefix, local_metadata):
    raise _CheckpointHookFailed("checkpoint hook failed")


@pytest.mark.parametrize("where", ["root", "block"])
def test_state_dict_that_raises_inside_leaves_weights_modified_then_restored(where):
    m = _llama(special=False)
    before = raw_state(m)
    orig = _original_state(m)
    x = example_inputs("llama")
    with SurgicalTheater(m, modification_type="scale", factor=0.5, params="all"):
        modified = raw_state(m)
        logits = m(**x).logits
        target = m if where == "root" else m.model.layers[0].mlp
        handle = target.register_state_dict_post_hook(_failing_post_hook)
        for _ in range(2):
            with pytest.raises(_CheckpointHookFailed):
                m.state_dict()
            # nothing was swapped: the model still computes with (and holds) the modification
            assert differing_bytes(modified, raw_state(m)) == 0
            assert torch.equal(m(**x).logits, logits)
        handle.remove()
        _assert_bits_equal(m.state_dict(), orig)  # the guard still works for later calls
        assert differing_bytes(modified, raw_state(m)) == 0
    assert differing_bytes(before, raw_state(m)) == 0
    assert active_theaters() == ()


def test_torch_save_to_a_full_disk_inside_surgery():
    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise OSError(28, "No space left on device")

    m = _llama()
    before = raw_state(m)
    with SurgicalTheater(m, modification_type="noise", seed=1, params="all"):
        modified = raw_state(m)
        with pytest.raises((OSError, RuntimeError)):
            torch.save(m.state_dict(), FullDisk())
        assert differing_bytes(modified, raw_state(m)) == 0
    assert differing_bytes(before, raw_state(m)) == 0


def test_state_dict_never_writes_live_weights():
    """Exception safety by construction: during state_dict() the parameters hold the
    modification (a hook that reads them sees modified values) and returned entries never
    alias them."""
    m = _llama()
    orig = _original_state(m)
    seen = {}

    def spy(module, state_dict, prefix, local_metadata):
        seen["w"] = module.weight.detach().clone()

    m.lm_head.register_state_dict_post_hook(spy)
    with SurgicalTheater(m, layers="lm_head", modification_type="scale", factor=2.0):
        live = m.lm_head.weight
        sd = m.state_dict(keep_vars=True)
        # the model's own hook saw the modified weight
        assert torch.equal(seen["w"].view(torch.uint8), live.detach().view(torch.uint8))
        assert isinstance(sd["lm_head.weight"], torch.nn.Parameter)
        assert sd["lm_head.weight"].data_ptr() != live.data_ptr()
        assert getattr(sd["lm_head.weight"], ORIGINAL_MARK)
        assert torch.equal(sd["lm_head.weight"].detach().view(torch.uint8),
                           orig["lm_head.weight"].view(torch.uint8))


def test_nested_theaters_state_dict_gives_the_outermost_originals():
    m = _llama()
    orig = _original_state(m)
    with SurgicalTheater(m, layers=0, modification_type="scale", factor=2.0):
        with SurgicalTheater(m, layers=[0, 1], modification_type="noise", seed=3):
            with SurgicalTheater(m, layers="lm_head", modification_type="disable"):
                _assert_bits_equal(m.state_dict(), orig)
                layer0 = m.model.layers[0].state_dict()
                for k, v in layer0.items():
                    assert torch.equal(v.view(torch.uint8),
                                       orig[f"model.layers.0.{k}"].view(torch.uint8)), k


def test_restore_that_fails_part_way_keeps_snapshots_and_can_be_retried(monkeypatch):
    from flex_surgery.surgery.snapshot import Snapshot

    m = _llama()
    before = raw_state(m)
    target = m.model.layers[1].mlp.up_proj.weight
    restore = Snapshot.restore
    failures = []

    def flaky(self):
        if self.local.data_ptr() == target.data_ptr() and not failures:
            failures.append(True)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        restore(self)

    monkeypatch.setattr(Snapshot, "restore", flaky)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    theater = SurgicalTheater(m, modification_type="scale", factor=0.5, params="all")
    with pytest.raises(RestoreError, match="up_proj") as info:
        with theater:
            pass
    assert isinstance(info.value.__cause__, RuntimeError)
    assert active_theaters() == (theater,)  # still active, guards in place
    assert differing_bytes(before, raw_state(m)) > 0
    with pytest.raises(SurgeryError, match="optimizer.step"):
        opt.step()
    theater.restore()  # the retry puts everything back
    assert differing_bytes(before, raw_state(m)) == 0
    assert active_theaters() == ()
    with pytest.raises(SurgeryError, match="not active"):
        theater.restore()


def test_failed_restore_of_an_inner_theater_blocks_the_outer_until_retried(monkeypatch):
    from flex_surgery.surgery.snapshot import Snapshot

    m = _llama()
    before = raw_state(m)
    restore = Snapshot.restore
    fail = [True]

    def flaky(self):
        if fail[0]:
            fail[0] = False
            raise RuntimeError("device error")
        restore(self)

    outer = SurgicalTheater(m, layers=0, modification_type="scale", factor=2.0)
    inner = SurgicalTheater(m, layers=[0, 1], modification_type="noise", seed=1)
    outer.__enter__()
    inner.__enter__()
    monkeypatch.setattr(Snapshot, "restore", flaky)
    with pytest.raises(RestoreError):
        inner.__exit__(None, None, None)
    with pytest.raises(SurgeryError, match="out of order"):
        outer.__exit__(None, None, None)
    inner.restore()
    outer.__exit__(None, None, None)
    assert differing_bytes(before, raw_state(m)) == 0
    assert active_theaters() == ()


def test_custom_delta_of_another_dtype_or_device_is_an_error():
    m = _llama(torch.bfloat16)
    before = raw_state(m)
    with pytest.raises(TypeError, match=r"lm_head.weight.*torch.float32.*torch.bfloat16"):
        with SurgicalTheater(m, layers="lm_head", modification_fn=lambda p: p.float() * 0.1):
            pass
    assert differing_bytes(before, raw_state(m)) == 0
    with pytest.raises(TypeError, match=r"on meta.*on cpu"):
        with SurgicalTheater(m, layers="lm_head",
                             modification_fn=lambda p: torch.empty_like(p, device="meta")):
            pass
    assert differing_bytes(before, raw_state(m)) == 0 and active_theaters() == ()


def test_seeded_noise_is_drawn_on_a_cpu_generator_and_copied(monkeypatch):
    """The generator rule: CPU generator per (seed, name, block), fp32, scaled, then copied
    to the parameter's device -- so a CUDA layout gets the CPU noise (checked for real by
    _test/test_surgery_cuda.py)."""
    made = []
    real = torch.Generator

    def recording(device="cpu"):
        made.append(torch.device(device).type)
        return real(device=device)

    import flex_surgery.surgery.theater as theater

    monkeypatch.setattr(theater.torch, "Generator", recording)
    m = _llama()
    with SurgicalTheater(m, layers=0, modification_type="noise", seed=0):
        pass
    assert made and set(made) == {"cpu"}


def test_optimizer_step_inside_surgery_raises_and_training_continues_after():
    m = _llama(special=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = example_inputs("llama")
    m(**x).logits.sum().backward()
    with SurgicalTheater(m, modification_type="noise", seed=0):
        with pytest.raises(SurgeryError, match="optimizer.step"):
            opt.step()
    opt.step()


# ------------------------------------------------------------------- sharded layouts
def _logits(out) -> torch.Tensor:
    logits = out.logits
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits


def _tp_plan():
    return llama_tp_plan(2)


def _wrap(layout: str):
    """The tiny Llama in ``layout`` and the module a failing checkpoint hook is put on."""
    from torch.distributed.device_mesh import init_device_mesh

    model = tiny_hf_model("llama")
    if layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
        return wrapped, model.model.layers[0]
    if layout.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                       use_orig_params=layout == "fsdp1_orig", device_id=torch.device("cpu"))
        # FSDP1 keeps its gather context open through its units' state_dict: a hook that
        # raises in there breaks FSDP itself, so the failing hook sits on the root, after it.
        return wrapped, wrapped
    mesh = init_device_mesh("cpu", (2,))
    if layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model.model.layers[0]
    from torch.distributed.tensor.parallel import parallelize_module

    model = parallelize_module(model, mesh, _tp_plan())
    return model, model.model.layers[1].mlp


def _full_state(sd):
    return {k.removeprefix("module."): (v.full_tensor() if hasattr(v, "full_tensor") else v)
            for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["ddp", "fsdp1_orig", "fsdp1_flat", "fsdp2", "dtensor_tp"])
@distributed(world_size=2)
def test_failing_checkpoint_inside_sharded_surgery(layout):
    """A checkpoint hook that raises inside surgery: the weights stay modified inside, the next
    state_dict() returns the originals (equal to the single-process model's), and exit restores
    every local shard bit for bit."""
    model, inner = _wrap(layout)
    ref = {k: v.clone() for k, v in tiny_hf_model("llama").state_dict().items()}
    x = example_inputs("llama")  # the same batch on every rank (TP needs it)
    before = raw_state(model)
    with torch.no_grad():
        base = _logits(model(**x))  # leaves FSDP roots gathered
        with SurgicalTheater(model, modification_type="noise", seed=5, noise_scale=0.05,
                             params="all"):
            logits = _logits(model(**x))
            modified = raw_state(model)
            for target in {id(model): model, id(inner): inner}.values():
                handle = target.register_state_dict_post_hook(_failing_post_hook)
                with pytest.raises(_CheckpointHookFailed):
                    model.state_dict()
                handle.remove()
                assert differing_bytes(modified, raw_state(model)) == 0
                torch.testing.assert_close(_logits(model(**x)), logits, rtol=0, atol=0)
            got = _full_state(model.state_dict())
            assert got.keys() == ref.keys()
            for k, v in ref.items():
                assert torch.equal(got[k], v), k
        assert not torch.allclose(logits, base)
    assert differing_bytes(before, raw_state(model)) == 0
    torch.testing.assert_close(_logits(model(**x)), base, rtol=0, atol=0)


def _same_entry(a, b) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(a, ShardedTensor):
        sa, sb = a.local_shards(), b.local_shards()
        return len(sa) == len(sb) and all(
            x.metadata.shard_offsets == y.metadata.shard_offsets and torch.equal(x.tensor, y.tensor)
            for x, y in zip(sa, sb))
    if hasattr(a, "_local_tensor"):
        return a.placements == b.placements and torch.equal(a._local_tensor, b._local_tensor)
    return a.device == b.device and torch.equal(a, b)


@pytest.mark.parametrize("config", ["full_rank0", "sharded"])
@distributed(world_size=2)
def test_fsdp1_state_dict_types_inside_surgery_equal_the_ones_outside(config):
    from torch.distributed.fsdp import FullStateDictConfig, ShardedStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model, _ = _wrap("fsdp1_flat")
    kind, cfg = {
        "full_rank0": (StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)),
        "sharded": (StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig()),
    }[config]
    with torch.no_grad():
        model(**example_inputs("llama"))  # FSDP's lazy initialisation
    with FSDP.state_dict_type(model, kind, cfg):
        outside = model.state_dict()
        with SurgicalTheater(model, layers=[0, "lm_head"], modification_type="scale",
                             factor=0.5, params="all"):
            inside = model.state_dict()
    assert inside.keys() == outside.keys()
    assert outside or (config == "full_rank0" and dist.get_rank() != 0)
    for k in outside:
        assert _same_entry(inside[k], outside[k]), k


@distributed(world_size=2)
def test_fsdp1_local_state_dict_inside_surgery_is_an_error_and_harmless():
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    model, _ = _wrap("fsdp1_orig")
    x = example_inputs("llama")
    before = raw_state(model)
    with torch.no_grad():
        base = _logits(model(**x))
        with SurgicalTheater(model, modification_type="scale", factor=0.5):
            logits = _logits(model(**x))
            with FSDP.state_dict_type(model, StateDictType.LOCAL_STATE_DICT):
                with pytest.raises(SurgeryError, match="LOCAL_STATE_DICT"):
                    model.state_dict()
            torch.testing.assert_close(_logits(model(**x)), logits, rtol=0, atol=0)
            model.state_dict()  # FULL_STATE_DICT again: fine
    assert differing_bytes(before, raw_state(model)) == 0
    torch.testing.assert_close(_logits(model(**x)), base, rtol=0, atol=0)


def test_a_hook_registration_that_fails_part_way_leaves_no_hook_bound(monkeypatch):
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    m = _llama()
    before = raw_state(m)
    register = torch.nn.Module.register_state_dict_post_hook
    calls = []

    def fails_on_third(self, hook):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("registration failed")
        return register(self, hook)

    monkeypatch.setattr(torch.nn.Module, "register_state_dict_post_hook", fails_on_third)
    optimizer_hooks = len(_global_optimizer_pre_hooks)
    with pytest.raises(RuntimeError, match="registration failed"):
        with SurgicalTheater(m, modification_type="scale", params="all"):
            pytest.fail("body must not run")
    assert len(calls) == 3
    assert all(not mod._state_dict_hooks for mod in m.modules())
    assert len(_global_optimizer_pre_hooks) == optimizer_hooks
    assert differing_bytes(before, raw_state(m)) == 0 and active_theaters() == ()
