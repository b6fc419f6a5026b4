"""``retrieval_overhead.py --device cuda``: retrieval to host on GPUs, in a few minutes.

One GPU: a ~1.1B-parameter Llama built from a config (TinyLlama's shape: hidden 2048, 22
blocks, intermediate 5632, 32 heads / 4 KV heads, vocabulary 32000; random bf16 weights on the
GPU) with a retrieval hook on every block's output, 4 x 1024 tokens. Interleaved rounds of a
forward with the hooks disabled (``plain``), with retrieval to host (``read``), and the floor:
the same bytes copied into preallocated pinned host buffers (``copy``), all timed with CUDA
events after a synchronize. Printed:

* ``added``: (read - plain) / plain, paired per round (target <= 10 %);
* ``overlap``: 1 - (read - plain) / copy -- the share of the device-to-host traffic hidden
  behind compute (target >= 80 %);
* peak device memory of the read forward over the plain forward's, in activations of one block
  (target: <= one gathered activation more).

The stored tensors are asserted equal to raw ``register_forward_hook`` copies of the same
forward. With two or more GPUs, the TP=2 layouts of ``retrieval_overhead.py`` run over NCCL.
Without a GPU it checks its arguments and the model's size on the ``meta`` device, prints why
it skipped, and exits 0.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import quantile  # noqa: E402
from targets import REPETITIONS, check_targets  # noqa: E402

TARGETS = {"cuda_added": 0.10, "cuda_hidden_share_missing": 0.20, "cuda_memory_blocks": 1.0}
BATCH, SEQ = 4, 1024


def llama_1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                       max_position_embeddings=2048, use_cache=False, tie_word_embeddings=False)


def parameter_count(config) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def one_gpu(reps: int) -> dict:
    from transformers import LlamaForCausalLM

    from flex_surgery.hooks import FlexModel, HookFunction

    config = llama_1b_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), device="cuda")
    names = [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
    stored: dict = {}
    flex = FlexModel(model, stored)
    for name in names:
        flex.register_forward_hook(HookFunction(name))
    raw: dict = {}
    raw_on = [False]
    modules = dict(model.named_modules())

    def capture(module, args, output, name):
        if raw_on[0]:
            t = output[0] if isinstance(output, tuple) else output
            raw[name] = t.detach().to("cpu", copy=True)

    for name in names:
        modules[name].register_forward_hook(lambda m, a, o, n=name: capture(m, a, o, n))

    act_shape = (BATCH, SEQ, config.hidden_size)
    device_acts = [torch.randn(act_shape, device="cuda", dtype=torch.bfloat16) for _ in names]
    host = [torch.empty(act_shape, dtype=torch.bfloat16, pin_memory=True) for _ in names]
    block_bytes = device_acts[0].numel() * device_acts[0].element_size()

    def plain():
        flex(ids, groups="all", complement=True)

    def read():
        flex(ids)

    def copy():
        for d, h in zip(device_acts, host):
            h.copy_(d, non_blocking=True)

    def clock(fn) -> float:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    with torch.no_grad():
        raw_on[0] = True
        read()
        raw_on[0] = False
        for name in names:
            assert torch.equal(stored[name][0], raw[name]), name
        stored.clear()
        for _ in range(3):
            plain(), read(), copy()
            stored.clear()
        fns = {"plain": plain, "read": read, "copy": copy}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(reps):
            order = list(fns)[r % 3:] + list(fns)[:r % 3]
            for name in order:
                times[name].append(clock(fns[name]))
                stored.clear()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        plain()
        plain_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        read()
        read_peak = torch.cuda.max_memory_allocated() - base
        stored.clear()
    flex.restore()
    added = [r - p for r, p in zip(times["read"], times["plain"])]
    med_plain, med_copy = statistics.median(times["plain"]), statistics.median(times["copy"])
    per_round = [a / p for a, p in zip(added, times["plain"])]
    return {"params": sum(p.numel() for p in model.parameters()), "hooks": len(names),
            "plain_s": med_plain, "copy_s": med_copy,
            "added": statistics.median(added) / med_plain,
            "added_q25": quantile(per_round, 0.25), "added_q75": quantile(per_round, 0.75),
            "overlap": 1 - statistics.median(added) / med_copy,
            "memory_blocks": (read_peak - plain_peak) / block_bytes}


def main(reps: int = 20, check: bool = False) -> int:
    """Exit status: 0 (also when skipped for want of a GPU), 1 when ``check`` fails."""
    config = llama_1b_config()
    count = parameter_count(config)
    assert 0.9e9 < count < 1.3e9, count
    if not torch.cuda.is_available():
        print(f"--device cuda: skipped, no CUDA device here (checked: the {count / 1e9:.2f}B "
              f"Llama config, {config.num_hidden_layers} retrieval hooks, {BATCH}x{SEQ} "
              f"tokens). Run on a machine with a GPU.")
        return 0
    status = 0
    if torch.cuda.device_count() >= 2:  # first: its ranks are forked before CUDA starts here
        from retrieval_overhead import run_nccl

        status = run_nccl(reps, check)
    runs = []
    for _ in range(REPETITIONS if check else 1):
        r = one_gpu(reps)
        runs.append(r)
        print(f"[1 GPU] {r['params'] / 1e9:.2f}B params, {r['hooks']} retrieval hooks: plain "
              f"{r['plain_s'] * 1e3:.1f} ms; added {r['added'] * 100:.1f} % "
              f"(per-round 25..75%: {r['added_q25'] * 100:.1f}..{r['added_q75'] * 100:.1f}); "
              f"copies alone {r['copy_s'] * 1e3:.1f} ms, overlap {r['overlap'] * 100:.0f} %; "
              f"peak device memory +{r['memory_blocks']:.2f} block activations")
    if check:
        measured = {"cuda_added": [r["added"] for r in runs],
                    "cuda_hidden_share_missing": [1 - r["overlap"] for r in runs],
                    "cuda_memory_blocks": [r["memory_blocks"] for r in runs]}
        status |= check_targets("retrieval_cuda", measured, TARGETS)
    return status
