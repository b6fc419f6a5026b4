"""Find the circuit of a small synthetic task in a tensor-parallel model (fairscale TP=2, CPU).

The task: 16 input features, of which only the first two matter -- the label is whether
``x0 * x1 > 0``. A dense MLP (16 -> 64 -> 64 -> 2) is trained on it first; then, under tensor
parallelism, a :class:`~flex_surgery.surgery.circuits.CircuitModel` learns continuous-
sparsification masks over its three layers with an L0 penalty and an exponential temperature
schedule. The circuit that remains keeps a few percent of the weights, still solves the task,
and its first layer reads (almost) only inputs 0 and 1. Each rank trains the mask of its own
shard; rank 0 writes a plot of L0 over the steps.

    python docs/examples/circuit_tp.py          # 2 forked ranks, gloo, well under a minute
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel, anneal_temperature

FEATURES, HIDDEN, CLASSES = 16, 64, 2


def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=gen)
    return x, (x[:, 0] * x[:, 1] > 0).long()


def dense_model(steps: int = 300) -> nn.Sequential:
    """The model whose circuit we look for: trained densely, the same on every rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN),
                          nn.GELU(), nn.Linear(HIDDEN, CLASSES))
    x, y = task(2048, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model


def tensor_parallel(dense: nn.Sequential) -> nn.Sequential:
    """The same weights in fairscale layers: column, row, and a column head gathering its
    output. Rank ``r`` copies its slice of each weight."""
    from fairscale.nn.model_parallel import initialize as fs
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

    tp, r = fs.get_model_parallel_world_size(), fs.get_model_parallel_rank()
    up = ColumnParallelLinear(FEATURES, HIDDEN, gather_output=False)
    mid = RowParallelLinear(HIDDEN, HIDDEN, input_is_parallel=True)
    head = ColumnParallelLinear(HIDDEN, CLASSES, gather_output=True)
    n, c = HIDDEN // tp, CLASSES // tp
    with torch.no_grad():
        up.weight.copy_(dense[0].weight[r * n:(r + 1) * n])
        up.bias.copy_(dense[0].bias[r * n:(r + 1) * n])
        mid.weight.copy_(dense[2].weight[:, r * n:(r + 1) * n])
        mid.bias.copy_(dense[2].bias)
        head.weight.copy_(dense[4].weight[r * c:(r + 1) * c])
        head.bias.copy_(dense[4].bias[r * c:(r + 1) * c])
    return nn.Sequential(up, nn.GELU(), mid, nn.GELU(), head)


def example(steps: int = 400, epochs: int = 8, plot: str | None = "circuit_tp_l0.png") -> dict:
    """Runs on every rank (``launch(example, nprocs=2)``); returns what the circuit found."""
    from fairscale.nn.model_parallel import initialize as fs

    start = time.perf_counter()
    fs.initialize_model_parallel(dist.get_world_size())
    try:
        model = tensor_parallel(dense_model())
        circuit = CircuitModel(CircuitConfig(
            mask_hparams=dict(ablation="none", mask_unit="weight", mask_bias=False,
                              mask_init_value=0.5),
            target_layers=["0", "2", "4"], l0_lambda=2e-3), model)
        opt = torch.optim.Adam(circuit.mask_logits.parameters(), lr=0.05)
        x, y = task(512, seed=2)                       # TP: every rank sees the same batch
        per_epoch = steps // epochs
        history = []
        for step in range(steps):
            loss = F.cross_entropy(circuit(x), y) + circuit.config.l0_lambda * circuit.l0_loss()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if (step + 1) % per_epoch == 0:            # the continuous-sparsification schedule
                anneal_temperature(circuit, (step + 1) // per_epoch, epochs,
                                   final_temperature=200.0)
            history.append(circuit.compute_l0_statistics()["total_l0"])
        circuit.eval()
        xt, yt = task(2048, seed=3)
        with torch.no_grad():
            accuracy = (circuit(xt).argmax(-1) == yt).float().mean().item()
            first = circuit.hard_masks()["0.weight"]    # full [64, 16] mask, on every rank
        stats = circuit.compute_l0_statistics()
        result = dict(accuracy=accuracy, l0=stats["total_l0"], max_l0=stats["max_l0"],
                      first_layer_inputs=first.sum(0).tolist(), history=history,
                      seconds=time.perf_counter() - start)
        if plot and dist.get_rank() == 0:
            _plot(history, stats["max_l0"], plot)
        return result
    finally:
        fs.destroy_model_parallel()


def _plot(history: list[float], max_l0: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(history) + 1), history)
    ax.axhline(max_l0, ls="--", c="gray", lw=0.8)
    ax.set(xlabel="step", ylabel="L0 (weights kept)", yscale="log",
           title="circuit mask, fairscale TP=2")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rank(rank: int, port: int) -> None:
    from flex_surgery.parallel.backend import init_distributed

    torch.set_num_threads(1)
    init_distributed(rank, 2, device="cpu", init_method=f"tcp://127.0.0.1:{port}")
    out = example()
    if rank == 0:
        print(f"accuracy {out['accuracy']:.3f}  L0 {out['l0']:.0f} of {out['max_l0']}  "
              f"first-layer weights kept per input {out['first_layer_inputs']}  "
              f"({out['seconds']:.1f} s)")
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.start_processes(_rank, args=(free_port,), nprocs=2, start_method="fork")
