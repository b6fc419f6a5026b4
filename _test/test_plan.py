"""The planner: shapes from a meta forward, bytes per hook and storing rank, bad input, the CLI,
and its numbers against what a real run stores and gathers (one process and forked ranks)."""

import json

import pytest
import torch
from rank_pool import distributed

from flex_surgery.__main__ import main
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.models import tiny_hf_model
from flex_surgery.models.tiny import example_inputs
from flex_surgery.plan import (
    MeshSizes,
    PlanError,
    hook_shapes,
    parse_bytes,
    parse_mesh,
    parse_tokens,
    place_hooks,
    plan,
    plan_hooks,
)

MiB, GiB = 2**20, 2**30
RESIDUALS = r"re:model\.layers\.\d+"


def _stored_bytes(output_dict):
    return {k: sum(t.numel() * t.element_size() for t in v) for k, v in output_dict.items()}


def _tiny_plan(model, mesh, batch, seq, patterns, store="memory"):
    config = model.config
    shapes = hook_shapes(config, batch, seq, torch.float32, patterns)
    return plan_hooks(place_hooks(config, shapes, mesh), mesh, batch, seq, torch.float32, store)


def test_70b_example_from_the_config():
    p = plan("llama-70b", parse_mesh("tp=8,pp=4,dp=8"), 8, 4096, torch.bfloat16, [RESIDUALS])
    assert len(p.hooks) == 80
    assert {h.replica_bytes for h in p.hooks} == {512 * MiB}  # per residual, block, replica
    assert {h.shape for h in p.hooks} == {(8, 4096, 8192)}
    assert p.stored == 320 * GiB and p.stored_per_rank[0] == 320 * GiB
    # dp: 7 replica slices per hook; pp: stages 1..3 (60 blocks) send their 4 GiB to rank 0
    assert p.moved == 80 * 7 * 512 * MiB + 60 * 4 * GiB
    assert [h.stage for h in p.hooks] == [i // 20 for i in range(80)]
    leaders = plan("llama-70b", parse_mesh("tp=8,pp=4,dp=8"), 8, 4096, torch.bfloat16,
                   [RESIDUALS], store="replica_leaders")
    assert leaders.moved == 0  # residuals are replicated over tp; nothing crosses replicas
    assert len(leaders.stored_per_rank) == 32
    assert set(leaders.stored_per_rank.values()) == {20 * 512 * MiB}
    assert leaders.stored == 320 * GiB


def test_tp_split_comes_from_the_models_plan():
    p = plan("llama-8b", parse_mesh("tp=4"), 1, 16, torch.bfloat16,
             [r"re:model\.layers\.0(\.self_attn\.[qo]_proj)?"])
    split = {h.name: h.tp_sharded for h in p.hooks}
    assert split == {"model.layers.0": False, "model.layers.0.self_attn.q_proj": True,
                     "model.layers.0.self_attn.o_proj": False}
    q = next(h for h in p.hooks if h.name.endswith("q_proj"))
    assert q.moved == q.replica_bytes * 3 // 4


def test_disk_bounds_host_memory_by_its_buffer():
    mesh = parse_mesh("dp=2")
    mem = plan("smollm2-135m", mesh, 4, 256, torch.bfloat16, [RESIDUALS])
    disk = plan("smollm2-135m", mesh, 4, 256, torch.bfloat16, [RESIDUALS], store="disk",
                disk_buffer=MiB)
    assert disk.stored == mem.stored and disk.moved == mem.moved
    largest = max(h.gathered for h in mem.hooks)
    assert disk.peak == MiB + largest < mem.peak == mem.stored + largest


def test_budget_refusal_names_hooks_bytes_and_what_fits():
    p = plan("llama-70b", parse_mesh("tp=8,pp=4,dp=8"), 8, 4096, torch.bfloat16, [RESIDUALS])
    p.check_budget(400 * GiB)  # fits
    with pytest.raises(PlanError) as err:
        p.check_budget(64 * GiB)
    text = str(err.value)
    assert "model.layers.0" in text and "324.00 GiB" in text and "rank 0" in text
    assert "store='replica_leaders'" in text and "reduce='last_token'" in text


@pytest.mark.parametrize("kwargs, words", [
    (dict(model="llama-700b"), "unknown model"),
    (dict(mesh="tp=3"), "does not divide the 64 attention heads"),
    (dict(mesh="pp=3"), "does not divide the 80 blocks"),
    (dict(model="gpt2", mesh="tp=2", hooks=["transformer.h.0"]), "no tensor-parallel plan"),
    (dict(hooks=["nothing.here.*"]), "matches"),
])
def test_bad_input_is_refused_clearly(kwargs, words):
    args = dict(model="llama-70b", mesh="tp=8", hooks=[RESIDUALS])
    args.update(kwargs)
    with pytest.raises(PlanError, match=words):
        plan(args["model"], parse_mesh(args["mesh"]), 1, 8, torch.bfloat16, args["hooks"])


@pytest.mark.parametrize("text", ["8by4096", "8x", "0x16", "x", "8x4096x2"])
def test_malformed_tokens(text):
    with pytest.raises(PlanError, match="--tokens"):
        parse_tokens(text)


@pytest.mark.parametrize("text", ["tp8", "tp=8,xp=2", "tp=0", "tp=2,tp=2", "tp=two"])
def test_malformed_mesh(text):
    with pytest.raises(PlanError, match="--mesh"):
        parse_mesh(text)


def test_sizes():
    assert parse_bytes("64GiB") == 64 * GiB and parse_bytes("1e9") == 10**9
    assert parse_bytes("500MB") == 500 * 10**6
    with pytest.raises(PlanError):
        parse_bytes("lots")


def test_cli_prints_the_plan_and_refuses_over_budget(capsys, tmp_path):
    args = ["plan", "--model", "smollm2-135m", "--mesh", "tp=3,dp=2", "--tokens", "2x16",
            "--hooks", RESIDUALS]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "model.layers.29" in out and "total (30 hooks)" in out and "storing ranks" in out
    assert main(args + ["--budget", "100KiB"]) == 2
    assert "over the budget" in capsys.readouterr().out
    assert main(args[:-4] + ["--tokens", "2by16", "--hooks", RESIDUALS]) == 2
    assert "--tokens" in capsys.readouterr().out
    config = tiny_hf_model("llama").config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--model", str(tmp_path), "--tokens", "1x8", "--hooks",
                 RESIDUALS]) == 0
    assert "total (2 hooks)" in capsys.readouterr().out


def test_planner_matches_one_process_run():
    """What one process's FlexModel stores equals the planner's bytes, hook by hook."""
    model = tiny_hf_model("llama")
    patterns = [RESIDUALS, "*.mlp.up_proj", "model.norm", "lm_head"]
    batch, seq = 2, 8
    p = _tiny_plan(model, MeshSizes(), batch, seq, patterns)
    out: dict = {}
    flex = FlexModel(model, out)
    for h in p.hooks:
        flex.register_forward_hook(HookFunction(h.name))
    flex(**example_inputs("llama", batch=batch, seq=seq))
    assert _stored_bytes(out) == {h.name: h.stored for h in p.hooks}
    assert p.stored_per_rank == {0: sum(_stored_bytes(out).values())}
    assert p.moved == 0


# -- forked ranks: the planner against what the runtime gathers and stores -----------------------

class _GatherCounter:
    """Wraps the runtime's gathers so a test sees the bytes each gather brings to its
    destination from the other ranks (whole result minus the destination's own piece)."""

    def __init__(self, monkeypatch) -> None:
        # The runtime's gathers go through the axis walk (one gather per sharded axis).
        import flex_surgery.parallel.axis_walk as runtime

        self.moved = 0
        original = runtime.gather_to_one

        def counting(t, dim, group=None, dst=0, sizes=None):
            out = original(t, dim, group, dst, sizes)
            import torch.distributed as dist

            if dist.get_rank(group) == dst:
                self.moved += (out.numel() - t.numel()) * out.element_size()
            return out

        monkeypatch.setattr(runtime, "gather_to_one", counting)
        # Retrieval on the CPU moves the pieces point to point to the leader in one step.
        original_collect = runtime.collect_pieces

        def counting_collect(t, *args, **kwargs):
            out = original_collect(t, *args, **kwargs)
            if out is not None:  # the leader: its own piece was not moved
                self.moved += (out.numel() - t.numel()) * out.element_size()
            return out

        monkeypatch.setattr(runtime, "collect_pieces", counting_collect)


def _total_over_ranks(value: int) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


# The MLP's activation is outside HF's TP plan but runs on a column layer's shard: the
# runtime gathers it, and the plan must count those bytes as moved.
HOOKED = [RESIDUALS, "*.self_attn.q_proj", "*.self_attn.o_proj", "*.mlp.up_proj",
          "*.mlp.act_fn"]


def _run_hooked(model, plan_, inputs, **flex_kwargs):
    out: dict = {}
    flex = FlexModel(model, out, **flex_kwargs)
    try:
        for h in plan_.hooks:
            flex.register_forward_hook(HookFunction(h.name))
        with torch.no_grad():
            flex(**inputs)
        return out
    finally:
        flex.close()


def _check_against_run(p, out, counter):
    import torch.distributed as dist

    stored = _stored_bytes(out)
    if dist.get_rank() == 0:
        assert stored == {h.name: h.stored for h in p.hooks}
        assert sum(stored.values()) == p.stored_per_rank[0]
    else:
        assert stored == {}
    assert _total_over_ranks(counter.moved) == p.moved


@distributed(world_size=2)
def test_planner_matches_tensor_parallel_run(tmp_path, monkeypatch):
    import torch.distributed as dist
    import transformers as tf

    folder = tmp_path / "tiny-llama"
    if dist.get_rank() == 0:
        tiny_hf_model("llama").save_pretrained(folder)
    dist.barrier()
    model = tf.LlamaForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=torch.float32)
    batch, seq = 2, 6
    p = _tiny_plan(model, MeshSizes(tp=2), batch, seq, HOOKED)
    assert any(h.tp_sharded for h in p.hooks) and p.moved > 0
    assert all(h.tp_sharded for h in p.hooks if h.name.endswith("act_fn"))
    counter = _GatherCounter(monkeypatch)
    out = _run_hooked(model, p, example_inputs("llama", batch=batch, seq=seq))
    _check_against_run(p, out, counter)


@distributed(world_size=2)
def test_planner_matches_data_parallel_run(monkeypatch):
    import torch.distributed as dist

    model = tiny_hf_model("llama")
    batch, seq = 3, 5  # per replica
    p = _tiny_plan(model, MeshSizes(dp=2), batch, seq, HOOKED)
    ids = example_inputs("llama", batch=2 * batch, seq=seq)["input_ids"]
    mine = ids[dist.get_rank() * batch:(dist.get_rank() + 1) * batch]
    counter = _GatherCounter(monkeypatch)
    out = _run_hooked(model, p, {"input_ids": mine}, data_parallel_size=2)
    _check_against_run(p, out, counter)


def test_flexmodel_refuses_a_plan_over_its_memory_budget():
    model = tiny_hf_model("llama")
    inputs = example_inputs("llama", batch=2, seq=8)
    residual = 2 * 8 * 64 * 4  # batch x seq x hidden x float32
    out: dict = {}
    flex = FlexModel(model, out, memory_budget=2 * residual)  # two residuals + the gather
    flex.register_forward_hook(HookFunction("model.layers.0"))
    flex.register_forward_hook(HookFunction("model.layers.1"))
    with pytest.raises(PlanError, match=r"over the budget.*model\.layers\.0"):
        flex(**inputs)
    assert out == {}  # refused before anything ran
    flex.close()
    out = {}
    with FlexModel(model, out, memory_budget=3 * residual) as flex:
        flex.register_forward_hook(HookFunction("model.layers.0"))
        flex.register_forward_hook(HookFunction("model.layers.1"))
        flex(**inputs)
        assert _stored_bytes(out) == {"model.layers.0": residual, "model.layers.1": residual}
    with FlexModel(model, {}, memory_budget="auto") as flex:
        flex.register_forward_hook(HookFunction("model.layers.0"))
        flex(**inputs)
    with pytest.raises(PlanError, match="memory_budget"):
        with FlexModel(model, {}, memory_budget=-1) as flex:
            flex.register_forward_hook(HookFunction("model.layers.0"))
            flex(**inputs)


@distributed(world_size=2)
def test_every_rank_refuses_the_same_plan():
    """Data parallel with uneven batches: each rank alone would decide differently; the agreed
    (largest) batch makes every rank refuse, before any gather."""
    import torch.distributed as dist

    model = tiny_hf_model("llama")
    batch = 3 if dist.get_rank() == 0 else 1
    ids = example_inputs("llama", batch=batch, seq=8)["input_ids"]
    budget = 2 * 2 * 8 * 64 * 4 + 2 * 8 * 64 * 4  # fits dp x batch 1, not dp x batch 3
    with FlexModel(model, {}, data_parallel_size=2, memory_budget=budget) as flex:
        flex.register_forward_hook(HookFunction("model.layers.0"))
        with pytest.raises(PlanError, match="over the budget"):
            flex(input_ids=ids)


@distributed(world_size=2)
def test_a_rank_that_cannot_plan_makes_every_rank_refuse():
    """Rank 1 is given embeddings, not token ids, so it cannot plan; rank 0 could. Every rank
    raises PlanError (before: rank 1 raised alone and rank 0 waited in the agreement)."""
    import torch.distributed as dist

    model = tiny_hf_model("llama")
    ids = example_inputs("llama", batch=2, seq=8)["input_ids"]
    with torch.no_grad():
        kwargs = {"input_ids": ids} if dist.get_rank() == 0 else \
            {"inputs_embeds": model.model.embed_tokens(ids)}
    with FlexModel(model, {}, data_parallel_size=2, memory_budget="64GiB") as flex:
        flex.register_forward_hook(HookFunction("model.layers.0"))
        with pytest.raises(PlanError) as info:
            flex(**kwargs)
    words = "another rank could not plan" if dist.get_rank() == 0 else "token ids"
    assert words in str(info.value)


class _LlamaStage(torch.nn.Module):
    """One of two pipeline stages of a tiny HF Llama, its modules under their whole-model names
    (``model.layers.1`` stays ``model.layers.1``); the hidden state goes stage to stage by
    send/recv."""

    def __init__(self, whole, stage: int) -> None:
        super().__init__()
        inner = whole.model
        self.stage = stage
        self.model = torch.nn.Module()
        self.model.rotary_emb = inner.rotary_emb
        self.model.layers = torch.nn.ModuleDict({str(stage): inner.layers[stage]})
        if stage == 0:
            self.model.embed_tokens = inner.embed_tokens
        else:
            self.model.norm = inner.norm
            self.lm_head = whole.lm_head
        self.hidden = whole.config.hidden_size

    def forward(self, input_ids):
        import torch.distributed as dist

        batch, seq = input_ids.shape
        positions = torch.arange(seq).expand(batch, seq)
        if self.stage == 0:
            h = self.model.embed_tokens(input_ids)
        else:
            h = torch.empty(batch, seq, self.hidden)
            dist.recv(h, src=0)
        rope = self.model.rotary_emb(h, positions)
        for layer in self.model.layers.values():
            h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope)
            h = h[0] if isinstance(h, tuple) else h
        if self.stage == 0:
            dist.send(h.contiguous(), dst=1)
            return h
        return self.lm_head(self.model.norm(h))


@distributed(world_size=2)
def test_planner_matches_pipeline_run(monkeypatch):
    import torch.distributed as dist

    import flex_surgery.parallel.pipeline as pipeline

    whole = tiny_hf_model("llama")
    batch, seq = 2, 7
    p = _tiny_plan(whole, MeshSizes(pp=2), batch, seq, HOOKED)
    assert {h.stage for h in p.hooks} == {0, 1}
    received = []
    original = pipeline._BlockingLine.recv_object

    def counting(self, stage):
        entries = original(self, stage)
        received.append(sum(t.numel() * t.element_size() for v in entries.values() for t in v))
        return entries

    monkeypatch.setattr(pipeline._BlockingLine, "recv_object", counting)
    out: dict = {}
    stage = dist.get_rank()
    flex = FlexModel(_LlamaStage(whole, stage), out, pipeline_parallel_size=2)
    try:
        for h in p.hooks:
            flex.register_forward_hook(HookFunction(h.name))
        with torch.no_grad():
            flex(example_inputs("llama", batch=batch, seq=seq)["input_ids"])
        mine = _stored_bytes(out)
        assert mine == {h.name: h.stored for h in p.hooks if h.stage == stage}
        flex.sync_pipeline_outputs()
    finally:
        flex.close()
    if stage == 0:
        assert _stored_bytes(out) == {h.name: h.stored for h in p.hooks}
        assert sum(received) == p.moved  # tp = dp = 1: only the pipeline sync moves
    else:
        assert out == {}


@distributed(world_size=2)
def test_a_stage_without_hooks_takes_part_in_the_budget_check():
    """Under pipelining a hook group matches modules of one stage only, so the other stage has
    no hooks: it skipped the budget agreement that the hooked stage waited in (a hang). Every
    rank now takes part; the budget is checked for the hooked stage's plan."""
    import torch.distributed as dist

    whole = tiny_hf_model("llama")
    stage = _LlamaStage(whole, dist.get_rank())
    stage.config = whole.config  # the budget plans from a transformers config
    ids = example_inputs("llama", batch=2, seq=8)["input_ids"]
    out: dict = {}
    with FlexModel(stage, out, pipeline_parallel_size=2, memory_budget=1) as flex:
        created = flex.create_hook_group("late", r"re:^model\.layers\.1$")
        assert len(created) == dist.get_rank()  # stage 1 only
        with pytest.raises(PlanError, match="over the budget"), torch.no_grad():
            flex(ids)
    with FlexModel(stage, out, pipeline_parallel_size=2, memory_budget="64GiB") as flex:
        flex.create_hook_group("late", r"re:^model\.layers\.1$")
        with torch.no_grad():
            flex(ids)
        flex.sync_pipeline_outputs()
    if dist.get_rank() == 0:
        assert list(out) == ["model.layers.1"]
