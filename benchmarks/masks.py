"""What does training a circuit mask cost, next to training the model's own weights?

A stack of 8 MLP blocks (``Linear`` H->4H, GELU, ``Linear`` 4H->H; H=256; 256 and 2048 tokens),
every linear layer masked (one mask logit per weight), is run forward + backward:

* ``plain``: the model's own weights trainable (what a fine-tuning step costs), no masks;
* ``masked``: a :class:`~flex_surgery.surgery.circuits.CircuitModel` with the base frozen and the
  soft masks ``sigmoid(T * logits)`` trainable, the L0 penalty added to the loss.

``ratio = masked / plain`` (target <= 1.3x). Measured unsharded (one process) and under
fairscale TP=2 (two forked ranks, gloo on CPU), repetitions interleaved, median and spread
(min and max of the per-repetition ratios). Before timing, correctness is asserted: with every
logit positive the eval (hard) circuit equals the plain model bit for bit, and every mask logit
gets a gradient. Prints the ratios and writes ``results/masks.json``.

``--check`` (``make bench``) measures the target's case, 2048 tokens (docs/circuits.md: at
256 tokens on CPU the element-wise mask work shows and no target is promised), 3 times, and
fails when a median exceeds 1.3x by more than 20 % (``targets.check_targets``).

    python benchmarks/masks.py [--reps 20] [--hidden 256] [--tokens 256 2048] [--check]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import REPETITIONS, check_targets  # noqa: E402

TARGET = 1.3  # masked / plain forward + backward, docs/circuits.md
CHECK_TOKENS = 2048

BLOCKS = 8
RESULTS = Path(__file__).resolve().parent.parent / "results" / "masks.json"


class Block(nn.Module):
    def __init__(self, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


def build(hidden: int, tp: bool) -> nn.Sequential:
    torch.manual_seed(0)
    if tp:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        return nn.Sequential(*[Block(ColumnParallelLinear(hidden, 4 * hidden,
                                                          gather_output=False),
                                     RowParallelLinear(4 * hidden, hidden,
                                                       input_is_parallel=True))
                               for _ in range(BLOCKS)])
    return nn.Sequential(*[Block(nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden))
                           for _ in range(BLOCKS)])


def measure(hidden: int, tokens: int, reps: int, tp: bool) -> dict:
    plain = build(hidden, tp)
    masked = CircuitModel(CircuitConfig(
        mask_hparams=dict(mask_init_value=1.0),
        target_layers=[f"{b}.{p}" for b in range(BLOCKS) for p in ("up", "down")],
        l0_lambda=1e-8), build(hidden, tp))
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():  # correctness first: an all-kept hard mask is the plain model
        masked.eval()
        assert torch.equal(masked(x), plain(x)), "hard all-ones mask changed the output"
        masked.train()

    def plain_step():
        plain(x).square().mean().backward()
        plain.zero_grad(set_to_none=True)

    def masked_step():
        (masked(x).square().mean() + masked.config.l0_lambda * masked.l0_loss()).backward()
        grads = [p.grad for p in masked.mask_logits.values()]
        assert all(g is not None for g in grads)
        masked.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        if dist.is_initialized():
            dist.barrier()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for _ in range(3):
        plain_step(), masked_step()
    times: dict[str, list[float]] = {"plain": [], "masked": []}
    for _ in range(reps):  # interleaved: load changes hit both alike
        times["plain"].append(timed(plain_step))
        times["masked"].append(timed(masked_step))
    ratios = [m / p for m, p in zip(times["masked"], times["plain"])]
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(ratio=med["masked"] / med["plain"], ratio_min=min(ratios),
                ratio_max=max(ratios), median_ratio_of_pairs=statistics.median(ratios),
                median_seconds=med)


def _tp_rank(hidden: int, tokens: int, reps: int) -> dict | None:
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(2)
    try:
        result = measure(hidden, tokens, reps, tp=True)
    finally:
        fs.destroy_model_parallel()
    return result if dist.get_rank() == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 2048],
                        help="token counts to measure (masks cost O(weights), matmuls "
                             "O(tokens x weights))")
    parser.add_argument("--check", action="store_true",
                        help=f"{CHECK_TOKENS} tokens, {REPETITIONS} repetitions; fail if a "
                             f"ratio exceeds {TARGET}x by more than 20 %%")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from flex_surgery.launch import fork_ranks

    results: dict = {}
    measured: dict[str, list[float]] = {"unsharded": [], "tp2": []}
    plan = [CHECK_TOKENS] * REPETITIONS if args.check else args.tokens
    for tokens in plan:
        entry = {"unsharded": measure(args.hidden, tokens, args.reps, tp=False)}
        entry["tp2"] = fork_ranks(_tp_rank, args.hidden, tokens, args.reps, nprocs=2,
                                  device="cpu", threads=1, timeout_s=1800)[0]
        results[f"tokens_{tokens}"] = entry
        for name in measured:
            measured[name].append(entry[name]["ratio"])
        for name in ("unsharded", "tp2"):
            r = entry[name]
            print(f"{tokens:5d} tokens {name:9s} masked / plain fwd+bwd = {r['ratio']:.2f}x "
                  f"(per-repetition ratios {r['ratio_min']:.2f}..{r['ratio_max']:.2f}), "
                  f"plain {r['median_seconds']['plain'] * 1e3:.1f} ms, "
                  f"masked {r['median_seconds']['masked'] * 1e3:.1f} ms")
    results["setup"] = dict(hidden=args.hidden, tokens=args.tokens, blocks=BLOCKS,
                            reps=args.reps, masked_linears=2 * BLOCKS, threads_per_rank=1,
                            device="cpu")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {RESULTS}")
    if args.check:
        sys.exit(check_targets("masks", {f"{k}_{CHECK_TOKENS}_tokens": v
                                         for k, v in measured.items()},
                               {f"{k}_{CHECK_TOKENS}_tokens": TARGET for k in measured}))


if __name__ == "__main__":
    main()
