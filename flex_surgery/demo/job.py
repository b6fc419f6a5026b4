"""What every rank of the demo runs: shard, retrieve, toggle hook groups, predict, ablate.

Each step is checked against *one process holding the whole model* (rank 0 loads it next to its
shard): retrieved activations, edited logits and every ablation's log-probability must agree,
and after every ablation each rank's local shards must be byte-identical, in the same storage,
to what they were before the sweep. Rank 0 returns a plain dict that the launching process
turns into the report; the other ranks return their own restore check.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves

from flex_surgery.anatomy import block_names
from flex_surgery.hooks import FlexModel
from flex_surgery.hooks.hook_function import pure_edit
from flex_surgery.surgery import SurgicalTheater, local_shards

# Retrieval groups: a name pattern per group (see flex_surgery.hooks.groups for the syntax).
# Under HF tensor parallelism q_proj/up_proj outputs are sharded on every rank, block outputs are
# replicated, and lm_head gathers its output itself.
RETRIEVAL_GROUPS = {
    "resid": r"re:model\.layers\.\d+",
    "attn_q": r"re:model\.layers\.\d+\.self_attn\.q_proj",
    "mlp_up": r"re:model\.layers\.\d+\.mlp\.up_proj",
    "logits": "lm_head",
}
EDIT_GROUP = "ablate_mlp"


@pure_edit
def zero_activation(module: nn.Module, tensor: torch.Tensor, save_ctx: Any,
                    modules: nn.ModuleDict) -> torch.Tensor:
    """Editing function: replace the (whole) activation by zeros.

    Pure (the same zeros on every rank, no side effect), so every rank edits its all-gathered
    copy and keeps its own slice instead of rank 0 editing and scattering the result."""
    return torch.zeros_like(tensor)


def load_tensor_parallel(folder: str) -> nn.Module:
    """The model sharded with HF's own TP plan over all ranks of the default group."""
    from transformers import AutoModelForCausalLM, DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(
        folder, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32)
    return model.eval()


def load_whole(folder: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def register_groups(flex: FlexModel, edited_module: str) -> None:
    for group, pattern in RETRIEVAL_GROUPS.items():
        flex.create_hook_group(group, pattern)
    flex.create_hook_group(EDIT_GROUP, f"re:{edited_module.replace('.', '[.]')}",
                           editing_function=zero_activation)


def next_token_logprobs(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits
    return logits[0, -1].float().log_softmax(-1)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (``torch.equal`` would call -0.0 and 0.0 equal, NaN unequal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))


def _max_diffs(ours: dict[str, list[torch.Tensor]],
               theirs: dict[str, list[torch.Tensor]]) -> dict[str, tuple[float, float]]:
    """Per key: (max abs difference, that divided by the reference's max magnitude)."""
    if sorted(ours) != sorted(theirs):
        raise AssertionError(f"retrieved keys differ: {sorted(set(ours) ^ set(theirs))}")
    diffs = {}
    for key, ref in theirs.items():
        got = ours[key]
        if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref)):
            raise AssertionError(f"{key}: shapes {[tuple(g.shape) for g in got]} vs "
                                 f"{[tuple(r.shape) for r in ref]}")
        abs_diff = max((g - r).abs().max().item() for g, r in zip(got, ref))
        scale = max(r.abs().max().item() for r in ref) or 1.0
        diffs[key] = (abs_diff, abs_diff / scale)
    return diffs


def _shape_recorder(table: dict[str, tuple[int, ...]], name: str):
    def record(module: nn.Module, args: Any, output: Any) -> None:
        first = next(t for t in tree_leaves(output) if isinstance(t, torch.Tensor))
        table[name] = tuple(first.shape)

    return record


class _Clock:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = now - self._t
        self._t = now


def demo_rank(folder: str, input_ids: list[int], max_blocks: int | None = None,
              check_reference: bool = True) -> dict[str, Any]:
    """The demo on this rank (every rank of the default process group calls it)."""
    rank = dist.get_rank()
    clock = _Clock()
    model = load_tensor_parallel(folder)
    solo = dist.new_group([0])  # rank 0's reference runs in a world of its own
    reference = load_whole(folder) if check_reference and rank == 0 else None
    clock.lap("load")
    if rank == 0:
        print(f"[rank 0] sharded over {dist.get_world_size()} ranks in "
              f"{clock.times['load']:.1f} s", flush=True)
    ids = torch.tensor([input_ids])
    blocks = block_names(model)
    edited = f"{blocks[len(blocks) // 2]}.mlp.up_proj"

    # keep="all" (FlexModel's default, spelled out): output_dict[name] is a list with one
    # tensor per call, compared entry by entry with one process; keep="last" would store the
    # latest call's tensor itself.
    flex = FlexModel(model, {}, keep="all")
    register_groups(flex, edited)
    ref_flex = None
    if reference is not None:
        ref_flex = FlexModel(reference, {}, process_group=solo, keep="all")
        register_groups(ref_flex, edited)
    result: dict[str, Any] = {"rank": rank, "world_size": dist.get_world_size(),
                              "num_blocks": len(blocks), "edited_module": edited}
    base = retrieve_everything(flex, ref_flex, ids, result)
    clock.lap("retrieve")
    result["group_calls"] = toggle_groups(flex, ref_flex, ids, base)
    flex.restore()
    if ref_flex is not None:
        ref_flex.restore()
    clock.lap("groups")
    n = len(blocks) if max_blocks is None else min(max_blocks, len(blocks))
    result["sweep"] = ablation_sweep(model, reference, ids, int(base.argmax()), n)
    clock.lap("sweep")
    result["timings"] = clock.times
    return result


def retrieve_everything(flex: FlexModel, ref_flex: FlexModel | None, ids: torch.Tensor,
                        result: dict[str, Any]) -> torch.Tensor:
    """One call with every retrieval group (everything but the edit group), each stored
    activation compared with one process; adds the prediction, and on rank 0 the hook map, to
    ``result``. Returns the next-token log-probabilities."""
    # What each hooked module holds on this rank, to show which activations were sharded.
    local_shapes: dict[str, tuple[int, ...]] = {}
    edits = set(flex.get_group_hook_functions(EDIT_GROUP))
    watched = {hf.module_name for hf in flex.hook_functions if hf not in edits}
    handles = [module.register_forward_hook(_shape_recorder(local_shapes, name))
               for name, module in flex.module.named_modules() if name in watched]
    base = next_token_logprobs(flex, ids, groups=EDIT_GROUP, complement=True)
    for handle in handles:
        handle.remove()
    retrieved = flex.output_dict
    if ref_flex is not None:
        ref_base = next_token_logprobs(ref_flex, ids, groups=EDIT_GROUP, complement=True)
        diffs = _max_diffs(retrieved, ref_flex.output_dict)
        sharded = sorted(k for k, v in retrieved.items() if tuple(v[0].shape) != local_shapes[k])
        result["retrieval"] = {"count": len(diffs), "diffs": diffs, "sharded": sharded,
                               "logprob_diff": (base - ref_base).abs().max().item(),
                               "reference_top1": int(ref_base.argmax())}
    if dist.get_rank() == 0:
        from flex_surgery.viz import hook_map

        result["shapes"] = {k: tuple(v[0].shape) for k, v in retrieved.items()}
        hmap = hook_map(flex, title=f"FlexModel hooks on rank 0 of {dist.get_world_size()}")
        result["hook_map_text"] = hmap.text()
        result["hook_map_html"] = hmap.html()
    top = int(base.argmax())
    result["prediction"] = {"top1": top, "logprob": base[top].item(),
                            "top5": base.topk(5).indices.tolist()}
    return base


def toggle_groups(flex: FlexModel, ref_flex: FlexModel | None, ids: torch.Tensor,
                  base: torch.Tensor) -> list[dict[str, Any]]:
    """Three calls choosing different groups: what each stored, and how the prediction moved
    (the edit group must change it only in the call that selects it)."""
    top = int(base.argmax())
    calls = []
    for groups in (["resid"], [EDIT_GROUP, "logits"], ["logits"]):
        flex.output_dict = {}
        lp = next_token_logprobs(flex, ids, groups=groups)
        call = {"groups": groups, "stored": sorted(flex.output_dict),
                "logprob": lp[top].item(), "top1": int(lp.argmax()),
                "unchanged": torch.equal(lp, base)}
        if ref_flex is not None:
            ref_flex.output_dict = {}
            call["reference_diff"] = (lp - next_token_logprobs(ref_flex, ids, groups=groups)
                                      ).abs().max().item()
        calls.append(call)
    return calls


def ablation_sweep(model: nn.Module, reference: nn.Module | None, ids: torch.Tensor, top: int,
                   num_blocks: int) -> list[dict[str, Any]]:
    """Zero each block's linear weights in a SurgicalTheater, measure the prediction, and check
    after every step that this rank's shards are byte-identical, in the same storage, to before
    (agreed over all ranks)."""
    from tqdm.auto import tqdm

    rank = dist.get_rank()
    before = [(s.name, s.local.detach().clone(), s.local.data_ptr()) for s in local_shards(model)]
    rows = []
    for i in tqdm(range(num_blocks), desc="ablating blocks", disable=rank != 0, leave=False):
        with SurgicalTheater(model, layers=[i], modification_type="disable") as theater:
            lp = next_token_logprobs(model, ids)
        now = local_shards(model)
        exact = len(now) == len(before) and all(
            name == s.name and ptr == s.local.data_ptr() and same_bytes(saved, s.local)
            for (name, saved, ptr), s in zip(before, now))
        flag = torch.tensor([int(exact)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        row = {"block": i, "logprob": lp[top].item(), "top1": int(lp.argmax()),
               "top1_prob": lp.max().exp().item(), "restored_here": exact,
               "restored_all_ranks": bool(flag.item()),
               "modified_parameters": theater.stats["modified_parameters"]}
        if reference is not None:
            with SurgicalTheater(reference, layers=[i], modification_type="disable"):
                ref_lp = next_token_logprobs(reference, ids)
            row["reference_diff"] = (lp - ref_lp).abs().max().item()
        rows.append(row)
    return rows
