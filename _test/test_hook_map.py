"""The hook map: tree, collapsing, hook kinds and groups, sharding, HTML, and the inspect CLI."""

import re

import pytest
import torch
import torch.distributed as dist
from rank_pool import distributed
from torch import nn

from flex_surgery.hooks import FlexModel
from flex_surgery.models import TINY_ARCHITECTURES, tiny_hf_model
from flex_surgery.viz import hook_map


def _line(text: str, pattern: str) -> str:
    hits = [ln for ln in text.splitlines() if re.search(pattern, ln)]
    assert len(hits) == 1, (pattern, hits)
    return hits[0]


def test_identical_blocks_collapse_and_expand():
    hmap = hook_map(tiny_hf_model("llama"))
    text = hmap.text()
    assert _line(text, r"0\.\.1 x2 LlamaDecoderLayer")
    assert "embed_tokens Embedding no-bwd" in text
    assert "(0 sharded on this rank)" in text
    expanded = hmap.text(collapse=False)
    assert _line(expanded, r"- 0 LlamaDecoderLayer") and _line(expanded, r"- 1 LlamaDecoderLayer")
    assert len(expanded.splitlines()) > len(text.splitlines())
    shallow = hmap.text(max_depth=2)
    assert "q_proj" not in shallow and "layers ModuleList" in shallow


def test_flexmodel_hooks_kinds_and_groups_are_shown():
    flex = FlexModel(tiny_hf_model("llama"), {})
    flex.create_hook_group("resid", r"re:model\.layers\.\d+")
    flex.create_hook_group("ablate", "model.layers.1.mlp.up_proj",
                           editing_function=lambda m, t, c, d: t * 0)
    flex.create_hook_group("grads", "*.q_proj.weight", hook_type="tensor")
    flex.create_hook_group("pre", "model.norm", hook_type="forward_pre")
    hmap = hook_map(flex)
    text = hmap.text()
    # the edit on block 1 makes the blocks differ: no collapse any more
    assert "0..1" not in text
    assert _line(text, r"- 1 LlamaDecoderLayer <= fwd:read\[resid\]")
    assert _line(text, r"up_proj Linear <= fwd:edit\[ablate\]")
    assert len(re.findall(r"q_proj Linear <= grad\.weight:read\[grads\]", text)) == 2
    assert _line(text, r"norm LlamaRMSNorm <= pre:read\[pre\]")
    assert "groups: all, ablate, grads, pre, resid" in text
    kinds = sorted((name, h.kind, h.edits) for name, h in hmap.hooks)
    assert len(kinds) == 2 + 1 + 2 + 1
    assert ("model.layers.1.mlp.up_proj", "forward", True) in kinds
    node = {n.name: n for n in hmap.root.walk()}
    assert node["model.embed_tokens"].hookable == ("forward", "forward_pre", "full_backward_pre",
                                                   "tensor")
    assert node["model.layers.0.mlp.act_fn"].hookable == ("forward", "forward_pre",
                                                          "full_backward", "full_backward_pre")


def test_html_is_standalone(tmp_path):
    flex = FlexModel(tiny_hf_model("gpt2"), {})
    flex.create_hook_group("mlp", "*.mlp.c_fc")
    path = hook_map(flex).save_html(tmp_path / "map.html")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?https?:", page)
    assert page.count("<details") == page.count("</details>")
    # the hook table names every hook; the tree collapses the two identically hooked blocks
    assert "transformer.h.0.mlp.c_fc" in page and "transformer.h.1.mlp.c_fc" in page
    tree = page.split('<details class="table"')[0]
    assert "&times;2" in tree and "transformer.h.1.mlp.c_fc" not in tree


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_every_tiny_architecture_maps(arch):
    model = tiny_hf_model(arch)
    hmap = hook_map(model)
    names = {n.name for n in hmap.root.walk()}
    assert names == {n for n, _ in model.named_modules()}
    assert len(hmap.text(collapse=False).splitlines()) == len(names) + 4


def test_inspect_cli(tmp_path, capsys):
    from flex_surgery.__main__ import main

    out = tmp_path / "llama.html"
    assert main(["inspect", "llama", "--group", r"resid=re:model\.layers\.\d+",
                 "--group", "g:tensor=*.up_proj.weight", "--html", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0..1 x2 LlamaDecoderLayer <= fwd:read[resid]" in printed
    assert "up_proj Linear <= grad.weight:read[g]" in printed
    assert out.exists() and "model.layers.0.mlp.up_proj" in out.read_text()
    with pytest.raises(SystemExit):
        main(["inspect", "llama", "--group", "no_pattern"])


# -- sharding, on 2 ranks --------------------------------------------------------------------------
@distributed(world_size=2)
def test_dtensor_tp_and_fsdp2_sharding_is_shown():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    tp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    parallelize_module(tp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    hmap = hook_map(FlexModel(tp, {}))
    text = hmap.text()
    assert "mesh: dp=1 tp=2 pp=1" in text and f"this rank: dp=0 tp={rank}" in text
    assert _line(text, r"- 0 Linear \| weight 32x8 tp:Shard\(0\)->16x8 \| bias 32 "
                       r"tp:Shard\(0\)->16")
    assert _line(text, r"- 2 Linear \| weight 8x32 tp:Shard\(1\)->8x16$")
    col = next(p for p in hmap.root.children[0].params if p.name == "weight")
    assert (col.shard_dim, col.shard_index, col.num_shards) == (0, rank, 2)
    assert "<svg" in hmap.html() and f"shard {rank} of 2" in hmap.html()

    dp_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    fsdp = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    fully_shard(fsdp[0], mesh=dp_mesh)
    fully_shard(fsdp, mesh=dp_mesh)
    text = hook_map(fsdp).text()
    assert _line(text, r"Sequential <FSDP2>")
    assert _line(text, r"- 0 Linear <FSDP2> \| weight 6x8 dp:Shard\(0\)->3x8")


@distributed(world_size=2)
def test_fsdp1_flat_shards_are_shown():
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    model = FSDP(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)),
                 auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), device_id=torch.device("cpu"),
                 use_orig_params=True)
    text = hook_map(FlexModel(model, {})).text()
    assert "mesh: dp=2 tp=1 pp=1" in text
    assert _line(text, r"^Sequential <FSDP1 unit>$")
    # 48 + 6 elements of the first unit, 27 per rank: rank 0 has weight[0:27], no bias
    expected = (r"weight 6x8 fsdp1 flat\[0:27\]->27 \| bias 6 fsdp1 flat, none here->0"
                if dist.get_rank() == 0 else
                r"weight 6x8 fsdp1 flat\[27:48\]->21 \| bias 6 fsdp1 flat\[0:6\]->6")
    assert _line(text, r"- 0 Linear <FSDP1 unit> \| " + expected)


@distributed(world_size=2)
def test_fairscale_sharding_is_shown():
    from fairscale.nn.model_parallel import initialize_model_parallel
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

    initialize_model_parallel(2)
    torch.manual_seed(0)
    model = nn.Sequential(ColumnParallelLinear(8, 32, gather_output=False), nn.GELU(),
                          RowParallelLinear(32, 8, input_is_parallel=True))
    text = hook_map(model).text()
    assert _line(text, r"- 0 ColumnParallelLinear \| weight 32x8 tp:Shard\(0\)->16x8")
    assert _line(text, r"- 2 RowParallelLinear \| weight 8x32 tp:Shard\(1\)->8x16")


@distributed(world_size=2)
def test_hf_tensor_parallel_llama_is_mapped(tmp_path):
    from transformers import AutoModelForCausalLM, DistributedConfig

    folder = tmp_path / "llama"
    if dist.get_rank() == 0:
        tiny_hf_model("llama").save_pretrained(folder)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(
        folder, distributed_config=DistributedConfig(tp_plan="auto"))
    flex = FlexModel(model, {})
    flex.create_hook_group("up", "*.mlp.up_proj")
    text = hook_map(flex).text()
    assert "mesh: dp=1 tp=2 pp=1 (from hf_tp)" in text
    assert "HF tensor-parallel plan" in text
    assert _line(text, r"0\.\.1 x2 LlamaDecoderLayer")
    assert _line(text, r"up_proj Linear \| weight 128x64 tp:Shard\(0\)->64x64 <= fwd:read\[up\]")


def test_inspect_cli_sharded_over_forked_ranks(tmp_path, capsys):
    from flex_surgery.__main__ import main

    out = tmp_path / "tp.html"
    assert main(["inspect", "llama", "--tp", "2", "--group", "up=*.up_proj",
                 "--html", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "on rank 0 of 2" in printed and "mesh: dp=1 tp=2 pp=1" in printed
    assert _line(printed, r"up_proj Linear \| weight 128x64 tp:Shard\(0\)->64x64 <= fwd:read\[up\]")
    assert "shard 0 of 2" in out.read_text()
    with pytest.raises(SystemExit, match="--tp needs"):
        main(["inspect", "gpt2", "--tp", "2"])


@distributed(world_size=2)
def test_pipeline_stage_is_in_the_header():
    rank = dist.get_rank()
    stage = nn.Sequential(nn.Linear(4, 4), nn.Tanh())  # this rank's stage of a 2-stage model
    text = hook_map(FlexModel(stage, {}, pipeline_parallel_size=2)).text()
    assert f"mesh: dp=1 tp=1 pp=2 (from built); this rank: dp=0 tp=0 pp={rank}, " \
           f"pipeline stage {rank} of 2" in text
