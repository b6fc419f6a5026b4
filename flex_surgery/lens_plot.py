"""The logit lens's picture: a layers x positions heat map of the top-1 probability.

Kept apart from :mod:`flex_surgery.lens` (which re-exports :func:`plot_lens`) so that running
the lens never imports matplotlib.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flex_surgery.lens import LensResult

__all__ = ["plot_lens"]


def plot_lens(result: LensResult, path: str | Path, decode: Callable[[int], str] | None = None,
              input_tokens: Sequence[str] | None = None, batch_index: int = 0,
              title: str | None = None) -> Path:
    """A layers x positions heat map of the top-1 probability, each cell labelled with its
    top-1 token, saved as PNG. ``decode(id)`` turns ids into text (default: the id);
    ``input_tokens`` label the positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens, probs = result.top1()
    if tokens.ndim == 3:
        tokens, probs = tokens[:, batch_index], probs[:, batch_index]
    elif tokens.ndim != 2:
        raise ValueError(f"plot_lens plots [layers, positions]; got top-1 of shape "
                         f"{tuple(tokens.shape)}")
    decode = decode or str
    n_layers, n_pos = tokens.shape
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * n_pos, 0.9 + 0.32 * n_layers))
    image = ax.imshow(probs.numpy(), aspect="auto", origin="lower", cmap="Blues", vmin=0,
                      vmax=1)
    for i in range(n_layers):
        for j in range(n_pos):
            text = decode(int(tokens[i, j])).replace("\n", "\\n")
            text = text if text.strip() else "␣" * max(1, len(text))  # whitespace made visible
            ax.text(j, i, text if len(text) <= 10 else text[:9] + "…", ha="center",
                    va="center", fontsize=7, color="white" if probs[i, j] > 0.55 else "black")
    ax.set_yticks(range(n_layers), [str(g) for g in result.layers])
    ax.set_ylabel("block")
    if input_tokens is not None:
        ax.set_xticks(range(n_pos), [t.replace("\n", "\\n") for t in input_tokens],
                      rotation=45, ha="right")
    else:
        ax.set_xlabel("position")
    fig.colorbar(image, ax=ax, label="top-1 probability")
    ax.set_title(title or "logit lens: top-1 token per block and position")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
