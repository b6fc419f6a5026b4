"""What the agreement on unused parameters adds to a hooked forward under
``DistributedDataParallel(find_unused_parameters=True)`` with gradient hooks.

After each such forward every rank walks its outputs' autograd graph for the parameters it
reached (``flex_surgery.parallel.unused_parameters.reached_parameters``, the walk DDP itself
makes in C++ for ``find_unused_parameters``), then the ranks all-reduce one integer per
parameter. This times the walk on a random-weight GPT-2 (``GPT2Config(n_layer=L, n_embd=64,
n_head=2)``, batch 2 x 32 tokens) against the forward that made the graph, interleaved
(``_timing.rounds``), in one process: the all-reduce is one small collective, as each hook's
own. Correctness is asserted: the walk finds exactly the parameters a backward gives a
gradient, on the plain model (all of them) and with the last block's MLP skipped.

Also timed, the same way: what every forward under grad of a DDP split over data-parallel
ranks pays to follow its backward (``DistributedRuntime._follow_backward``: a hook on each
output an autograd node made, which tells the runtime when a backward reaches them). Asserted:
a backward calls it once, with the forward's number.

    python benchmarks/unused_parameters.py [--layers 6 24] [--reps 20]

Prints the walk's median time and its ratio to the forward, and writes
``results/unused_parameters.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import ratio, rounds, wall  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results" / "unused_parameters.json"


def build(n_layer: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=64, n_head=2)).eval()


def _given_gradients(model: torch.nn.Module, out: torch.Tensor) -> set[int]:
    """The parameters a backward from ``out`` gives a gradient: what the walk must find."""
    model.zero_grad(set_to_none=True)
    out.sum().backward()
    given = {id(p) for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return given


def check(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """The walk finds exactly the parameters a backward gives a gradient: every one on the
    plain model; all but the last block's MLP and its norm with that MLP skipped."""
    from flex_surgery.parallel.unused_parameters import reached_parameters

    out = model(ids).logits
    reached, opaque = reached_parameters(out)
    assert not opaque
    assert reached == _given_gradients(model, out) == {id(p) for p in model.parameters()}
    mlp = model.transformer.h[-1].mlp
    mlp.forward = lambda h: torch.zeros_like(h)  # the block's MLP unused in this forward
    try:
        out = model(ids).logits
        reached, _ = reached_parameters(out)
    finally:
        del mlp.forward
    assert reached == _given_gradients(model, out), "the walk and the backward disagree"
    assert not reached & {id(p) for p in mlp.parameters()}, "the walk saw the skipped MLP"


class _Follower:
    """What ``DistributedRuntime._follow_backward`` reads of its runtime: the arrivals."""

    def __init__(self) -> None:
        self._unused = self
        self.arrivals: list[int] = []

    def arrive(self, task: int, pass_: int) -> bool:
        self.arrivals.append(pass_)
        return False  # nothing queued for the backward's end


def check_follow(model: torch.nn.Module, ids: torch.Tensor) -> None:
    from flex_surgery.parallel.distributed_runtime import DistributedRuntime

    follower = _Follower()
    out = model(ids).logits
    DistributedRuntime._follow_backward(follower, out, 7)
    out.sum().backward()
    model.zero_grad(set_to_none=True)
    assert follower.arrivals == [7], follower.arrivals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 24])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    from flex_surgery.parallel.distributed_runtime import DistributedRuntime
    from flex_surgery.parallel.unused_parameters import reached_parameters

    results: dict = {}
    follower = _Follower()
    for n_layer in args.layers:
        model = build(n_layer)
        ids = torch.randint(0, model.config.vocab_size, (2, 32),
                            generator=torch.Generator().manual_seed(0))
        check(model, ids)
        check_follow(model, ids)
        kept = {}

        def forward(model=model, ids=ids, kept=kept) -> None:
            kept["out"] = model(ids).logits  # the graph the walk then reads

        forward()
        times = rounds({"forward": forward,
                        "walk": lambda kept=kept: reached_parameters(kept["out"]),
                        "follow": lambda kept=kept: DistributedRuntime._follow_backward(
                            follower, kept["out"], 1)},
                       args.reps, wall, inner=3)
        r = ratio(times, "walk", "forward")
        f = ratio(times, "follow", "forward")
        params = sum(1 for _ in model.parameters())
        print(f"[unused_parameters] GPT-2 {n_layer} blocks ({params} parameters): walk "
              f"{statistics.median(times['walk']) * 1e3:.2f} ms, {r['ratio']:.3f}x the forward "
              f"({statistics.median(times['forward']) * 1e3:.1f} ms; per-round 25..75%: "
              f"{r['q25']:.3f}..{r['q75']:.3f}); following its backward "
              f"{statistics.median(times['follow']) * 1e6:.1f} us, {f['ratio']:.4f}x")
        results[f"gpt2_{n_layer}"] = dict(
            parameters=params, walk_ms=statistics.median(times["walk"]) * 1e3,
            forward_ms=statistics.median(times["forward"]) * 1e3, walk_over_forward=r,
            follow_us=statistics.median(times["follow"]) * 1e6, follow_over_forward=f)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[unused_parameters] wrote {RESULTS}")


if __name__ == "__main__":
    main()
