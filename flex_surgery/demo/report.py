"""Turning rank 0's results into the printed report, the ablation plot and report.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from flex_surgery.demo.source import ModelSource

# Agreement with one process that the report calls "equal": float32 sums computed in a
# different order (sharded matmuls, all-reduce) differ in the last bits.
RELATIVE_TOLERANCE = 1e-4


def _fmt(x: float) -> str:
    return f"{x:.1e}" if x else "0"


def format_report(source: ModelSource, result: dict[str, Any], prompt: str,
                  launcher: str, files: list[Path]) -> str:
    tok = source.tokenizer
    pred = result["prediction"]
    top = pred["top1"]
    word = repr(tok.decode([top]))
    world = result["world_size"]
    lines = [f"flex_surgery demo: {source.name} sharded with HF tensor parallelism over "
             f"{world} ranks (gloo, {launcher} launcher)"]
    if source.note:
        lines.append(f"  note: {source.note}")
    t = result["timings"]
    lines.append(f"  timings: load {t['load']:.1f} s, retrieval {t['retrieve']:.1f} s, "
                 f"groups {t['groups']:.1f} s, sweep {t['sweep']:.1f} s")

    lines.append("")
    top5 = ", ".join(repr(tok.decode([i])) for i in pred["top5"])
    lines.append(f"next token for {prompt!r}: {word} (p={math.exp(pred['logprob']):.2f}; "
                 f"top 5: {top5})")
    retrieval = result.get("retrieval")
    if retrieval:
        same = "same as" if retrieval["reference_top1"] == top else "DIFFERENT FROM"
        lines.append(f"  {same} one process; max |logprob difference| "
                     f"{_fmt(retrieval['logprob_diff'])}")
        diffs = retrieval["diffs"]
        worst_key = max(diffs, key=lambda k: diffs[k][1])
        shapes = result["shapes"]
        sharded = len(retrieval["sharded"])
        lines.append(f"FlexModel retrieval: {retrieval['count']} activations gathered to rank 0 "
                     f"({sharded} of them held as shards by the ranks)")
        lines.append(f"  each equal to one process: max |diff| "
                     f"{_fmt(max(d[0] for d in diffs.values()))}, worst relative "
                     f"{_fmt(diffs[worst_key][1])} ({worst_key} {tuple(shapes[worst_key])})")

    lines.append("hook groups, chosen per call:")
    for call in result["group_calls"]:
        groups = "+".join(call["groups"])
        stored = call["stored"]
        what = (f"stored {len(stored)} tensor{'s' * (len(stored) != 1)}" if stored
                else "stored nothing")
        effect = ("logits unchanged" if call["unchanged"] else
                  f"logprob({word}) {pred['logprob']:.2f} -> {call['logprob']:.2f}, "
                  f"top-1 {tok.decode([call['top1']])!r}")
        ref = (f"; vs one process {_fmt(call['reference_diff'])}"
               if "reference_diff" in call else "")
        lines.append(f"  groups={groups:<18} {what:<20} {effect}{ref}")
    lines.append(f"  (ablate_mlp zeroes the whole up_proj output of {result['edited_module']}, "
                 "gathered from its shards)")

    rows = result["sweep"]
    lines.append("")
    lines.append(f"SurgicalTheater sweep: each block's linear weights zeroed in place, then "
                 f"restored ({len(rows)} of {result['num_blocks']} blocks)")
    lines.append(f"  block  logprob({word})   change  top-1")
    scale = max((pred["logprob"] - r["logprob"] for r in rows), default=0.0) or 1.0
    for r in rows:
        change = r["logprob"] - pred["logprob"]
        bar = "#" * round(12 * max(0.0, -change) / scale)
        top1 = tok.decode([r["top1"]])
        flag = "" if r["top1"] == top else "  <- prediction changes"
        lines.append(f"  {r['block']:>5}  {r['logprob']:>12.2f}  {change:>+7.2f}  "
                     f"{top1!r:<12} {bar}{flag}")
    restored = all(r["restored_all_ranks"] for r in rows)
    lines.append(
        f"  restores: {'every' if restored else 'NOT every'} local shard byte-identical, in "
        f"the same storage, on all {world} ranks after each of the {len(rows)} steps")
    ref_diffs = [r["reference_diff"] for r in rows if "reference_diff" in r]
    if ref_diffs:
        lines.append(f"  same sweep in one process: max |logprob difference| "
                     f"{_fmt(max(ref_diffs))}")
    lines.append("")
    lines.append("wrote " + ", ".join(str(f) for f in files))
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> list[str]:
    """What failed, if anything: the demo exits non-zero when a claim does not hold."""
    problems = []
    if not all(r["restored_all_ranks"] for r in result["sweep"]):
        problems.append("a SurgicalTheater restore was not byte-identical")
    retrieval = result.get("retrieval")
    if retrieval:
        worst = max(d[1] for d in retrieval["diffs"].values())
        if worst > RELATIVE_TOLERANCE:
            problems.append(f"retrieved activations differ from one process (relative {worst})")
        if retrieval["reference_top1"] != result["prediction"]["top1"]:
            problems.append("the sharded prediction differs from one process")
        calls = result["group_calls"]
        if any(c["reference_diff"] > 1e-3 for c in calls):
            problems.append("hook-group calls differ from one process")
        if any(r["reference_diff"] > 1e-3 for r in result["sweep"]):
            problems.append("the sharded sweep differs from one process")
    return problems


def plot_sweep(source: ModelSource, result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tok = source.tokenizer
    rows = result["sweep"]
    pred = result["prediction"]
    top = pred["top1"]
    blocks = [r["block"] for r in rows]
    change = [r["logprob"] - pred["logprob"] for r in rows]
    colors = ["#cf222e" if r["top1"] != top else "#0969da" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(rows) + 2), 4.2), dpi=120)
    ax.bar(blocks, change, color=colors)
    ax.axhline(0, color="#57606a", lw=0.8)
    ax.set_xlabel("disabled block (all linear weights zeroed, restored after)")
    ax.set_ylabel(f"change in log p({tok.decode([top])!r})")
    ax.set_title(f"{source.name}, tensor parallel over {result['world_size']} ranks: "
                 f"which block does the prediction need?", fontsize=10)
    low = min(change + [0.0])
    ax.set_ylim(low * 1.18 - 0.2, max(change + [0.0]) + 0.3)  # room for the labels below bars
    ax.set_xticks(blocks)
    ax.tick_params(axis="x", labelsize=7)
    for r, c in zip(rows, change):
        if r["top1"] != top:
            ax.annotate(repr(tok.decode([r["top1"]])), (r["block"], c), ha="center",
                        va="top", fontsize=6, rotation=90, xytext=(0, -3),
                        textcoords="offset points")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#0969da", label="top-1 unchanged"),
                       Patch(color="#cf222e", label="top-1 changes (new token below)")],
              fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(result: dict[str, Any], path: Path) -> Path:
    data = {k: v for k, v in result.items() if not k.startswith("hook_map")}
    path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    return path
