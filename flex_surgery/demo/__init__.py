"""``python -m flex_surgery demo``: a real pretrained model, sharded, read, edited and ablated.

One run: shard SmolLM2-135M with Hugging Face's own tensor parallelism over several gloo ranks;
read activations through :class:`~flex_surgery.hooks.FlexModel` hooks and check each against
one process holding the whole model; choose hook groups per call (an editing group changes the
prediction only when selected); predict the next token of a real prompt; then disable every
block in turn inside a :class:`~flex_surgery.surgery.SurgicalTheater`, measuring how the
prediction changes and verifying after every step that each rank's weights are byte-identical
to before. Writes a plot, the hook map (HTML) and the numbers (JSON).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flex_surgery.demo.config import DemoConfig
from flex_surgery.demo.job import demo_rank
from flex_surgery.demo.report import format_report, plot_sweep, verdict, write_json
from flex_surgery.demo.source import ModelSource, prepare_source
from flex_surgery.launch import launch

__all__ = ["DemoConfig", "DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: rank 0's numbers, the report text, the files, problems."""

    result: dict[str, Any]
    report: str
    files: list[Path]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def run_demo(config: DemoConfig | None = None, echo: bool = True) -> DemoResult:
    """Run the demo (``None``: the embedded default config); ``echo`` prints the report."""
    config = config or DemoConfig()
    start = time.perf_counter()
    say = print if echo else (lambda *a, **k: None)
    if config.model != "tiny":
        say("preparing the model (the first run converts SmolLM2's GGUF once, ~30 s) ...",
            flush=True)
    source = prepare_source(config)
    try:
        return _run(config, source, say, start)
    finally:
        if source.folder.name.startswith("flex_surgery_tiny_"):
            shutil.rmtree(source.folder, ignore_errors=True)


def _run(config: DemoConfig, source: ModelSource, say, start: float) -> DemoResult:
    nprocs = config.nprocs or source.default_nprocs()
    source.check_nprocs(nprocs)
    ids = source.tokenizer.encode(config.prompt)
    say(f"launching {nprocs} ranks ({config.launcher}) for {source.name} ...", flush=True)
    # CPU ranks (gloo): HF's TP plan on a GPU box would want one GPU per rank.
    results = launch(demo_rank, str(source.folder), ids, config.max_blocks,
                     config.check_reference, nprocs=nprocs, executor=config.launcher,
                     device="cpu", timeout_min=15)
    result = results[0]
    others_restored = all(all(r["restored_all_ranks"] for r in res["sweep"]) for res in results)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [plot_sweep(source, result, out / "ablation.png"),
             _write(out / "hook_map.html", result["hook_map_html"]),
             _write(out / "hook_map.txt", result["hook_map_text"]),
             write_json(result, out / "report.json")]
    text_path = out / "report.txt"  # written last, below: the report names it too
    report = format_report(source, result, config.prompt, config.launcher, [*files, text_path])
    problems = verdict(result)
    if not others_restored:
        problems.append("a rank reported a restore that was not byte-identical")
    report += f"\ndone in {time.perf_counter() - start:.0f} s"
    if problems:
        report += "\nPROBLEMS:\n  " + "\n  ".join(problems)
    files.append(_write(text_path, report))
    say(report, flush=True)
    return DemoResult(result, report, files, problems)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def main_exit_code(result: DemoResult) -> int:
    if not result.ok:
        print("demo checks failed", file=sys.stderr)
    return 0 if result.ok else 1
