"""Metadata inference is not a hook call (see :mod:`flex_surgery.parallel.pipeline`, point 2).

``torch.distributed.pipelining``'s ``PipelineStage`` (built without ``input_args`` /
``output_args``) runs an extra forward, and for training an extra backward, on its first step to
learn the shapes it will send. Hooks must neither store nor edit there, so those passes run
inside :func:`metadata_inference`, a process-wide flag (a counter rather than a thread-local,
because CUDA backward runs on autograd's device threads) that hooks read with
:func:`is_metadata_pass`. Kept apart from the stage traffic because hooks import it on every
call path, while :class:`~flex_surgery.parallel.stage_link.StageLink` is needed only under
pipelining.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["in_metadata_inference", "is_metadata_pass", "metadata_inference",
           "skip_metadata_inference"]

_inference_depth = 0

# Methods of torch.distributed.pipelining stages that run the shape/metadata inference passes:
# the first two in recent torch (2.13: forward and backward, on real tensors), the last in older
# versions (forward only, on meta tensors).
_INFERENCE_METHODS = ("_prepare_forward_infra", "_prepare_backward_infra", "_shape_inference")


@contextlib.contextmanager
def metadata_inference() -> Iterator[None]:
    """Mark the passes run inside as shape inference: hooks neither store nor edit there."""
    global _inference_depth
    _inference_depth += 1
    try:
        yield
    finally:
        _inference_depth -= 1


def in_metadata_inference() -> bool:
    """Whether a :func:`metadata_inference` block is running in this process."""
    return _inference_depth > 0


def is_metadata_pass(tensor: torch.Tensor) -> bool:
    """Whether a hook seeing ``tensor`` is part of a shape-inference pass, not a real call."""
    return _inference_depth > 0 or tensor.is_meta


def skip_metadata_inference(stage: Any) -> Any:
    """Make ``stage`` (a ``torch.distributed.pipelining`` stage) run its shape-inference passes
    inside :func:`metadata_inference`, so hooks ignore them. Returns the stage.

    Call it once per stage, before the schedule's first ``step``. It relies on the private
    method names in ``_INFERENCE_METHODS``; if a torch version has none of them, it raises
    rather than silently recording the extra pass.
    """
    wrapped = 0
    for name in _INFERENCE_METHODS:
        method = getattr(stage, name, None)
        if method is None:
            continue
        if not getattr(method, "_flex_inference", False):
            setattr(stage, name, _marked(method))
        wrapped += 1
    if not wrapped:
        raise TypeError(f"{type(stage).__name__} has none of {_INFERENCE_METHODS}: cannot tell "
                        "its shape-inference pass from a real one in this torch version; build "
                        "the stage with input_args/output_args so that it runs none")
    return stage


def _marked(method: Callable) -> Callable:
    """``method`` run inside :func:`metadata_inference`."""

    @functools.wraps(method)
    def marked(*args: Any, **kwargs: Any) -> Any:
        with metadata_inference():
            return method(*args, **kwargs)

    marked._flex_inference = True  # type: ignore[attr-defined]
    return marked
