"""What the layout tracker costs per module call under tensor parallelism.

Under TP every module of a watched model gets a forward pre-hook and a forward hook
(``flex_surgery.parallel.layout_tracker.TPTracker._enter`` / ``_leave``): they record which TP
layer ran last and, where a module took the very tensor a TP layer took in, what described it
before, and what describes the tensors each module returns (a tensor made before a TP layer
ran keeps that description when a hook sees it after; see the module docstring there). This
runs on every module call of every forward, hooks registered or not, so it is a per-forward
host cost proportional to the number of module
calls (about 1,300 in a forward of an 80-layer Llama).

Measured in one process, on the hook functions themselves (``timeit``, best of 5 repeats of
200,000 calls), next to the floor: a pair of Python hooks that do nothing. Two states: before
any TP layer ran in the forward, and after one (the tracker then looks through the layer's
input). Correctness is asserted: the module's output after a TP layer that took the same
tensor is described by what that layer consumed.

    python benchmarks/tracker_overhead.py  # writes results/tracker_overhead.json
"""

from __future__ import annotations

import json
import os
import timeit

import torch
from torch import nn

from flex_surgery.parallel.layout import LayoutInference
from flex_surgery.parallel.layout_tracker import _Produced, _Taken
from flex_surgery.parallel.mesh import ParallelMesh

CALLS, REPEATS = 200_000, 5


def _per_call_us(fn) -> float:
    return min(timeit.repeat(fn, number=CALLS, repeat=REPEATS)) / CALLS * 1e6


def main() -> None:
    torch.set_num_threads(1)
    mesh = ParallelMesh({"dp": None, "tp": None, "pp": None}, {"dp": 1, "tp": 1, "pp": 1},
                        {"dp": 0, "tp": 0, "pp": 0})
    tracker = LayoutInference(mesh, 0)
    module, x, y = nn.GELU(), torch.randn(2, 3, 8), torch.randn(2, 3, 8)

    def noop_pre(module, args, kwargs):
        return None

    def noop_post(module, args, output):
        return None

    floor = _per_call_us(lambda: (noop_pre(module, (x,), {}), noop_post(module, (x,), y)))
    results = {"floor_pair_us": floor}
    column_out = _Produced((2, 3, 16), None)
    # after a TP layer (say a column layer) that took x, replicated; the module takes x too
    taken = {x.data_ptr(): [_Taken(x, None)]}
    for state, current, took in (("no_tp_layer_yet", None, {}),
                                 ("after_a_tp_layer", column_out, taken)):
        tracker._current, tracker._taken = current, took
        enter = _per_call_us(lambda: tracker._enter(module, (x,), {}))
        leave = _per_call_us(lambda: tracker._leave(module, (x,), y))
        results[state] = {"enter_us": enter, "leave_us": leave,
                          "pair_over_floor": (enter + leave) / floor}
        print(f"{state:18s} entry {enter:.2f} us, exit {leave:.2f} us: "
              f"{(enter + leave) / floor:.1f}x a pair of no-op Python hooks ({floor:.2f} us)")
    # what was timed was right: x is what the TP layer took, so it is described by how it was
    # taken (replicated)
    tracker._current, tracker._taken = column_out, {x.data_ptr(): [_Taken(x, None)]}
    tracker._enter(module, (x,), {})
    assert tracker.input_state(x) is None and tracker.output_state(module) is None
    tracker._enter(module, (y,), {})  # y did not come from there: the rule of time
    assert tracker.output_state(module) is tracker._current
    # a tensor a module made before the TP layer ran keeps what described it then
    tracker._current, tracker._taken = None, {}
    tracker._leave(module, (x,), y)
    tracker._current = column_out
    assert tracker.input_state(y) is None
    os.makedirs("results", exist_ok=True)
    with open("results/tracker_overhead.json", "w") as f:
        json.dump(results, f, indent=2)
    print("-> results/tracker_overhead.json")


if __name__ == "__main__":
    main()
