"""Continual learning served by one exported program: export once, inject after every epoch.

A small classifier is exported once with ``torch.export`` (dynamic batch size) and then trained
on two synthetic tasks in sequence, A then B. After every epoch the eager model's new weights
are injected into that same program with :func:`flex_surgery.export.inject_weights` -- no
re-export -- and the *program* is what is evaluated, as a server would be. Training on B makes
the model forget A; elastic weight consolidation (EWC, Kirkpatrick et al. 2017: a quadratic
penalty on moving the weights that mattered for A, weighted by their diagonal Fisher
information) forgets less. The script runs both, asserts after every injection that the program
computes exactly what the eager model computes, prints task-A accuracy per epoch and the
forgetting, and plots it.

Run: ``python examples/continual_learning.py [--epochs 6] [--out forgetting.png]`` (seconds on
a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from flex_surgery.export import inject_weights

DIM, CLASSES, HIDDEN = 16, 4, 64


def make_task(seed: int, shift: float, samples: int) -> tuple[tuple, tuple]:
    """Training and held-out data of one task: inputs around ``shift`` along a fixed direction,
    labelled by a random linear teacher of the task's own. The two tasks live in different
    regions and disagree on how to label."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(DIM, CLASSES, generator=gen)
    direction = torch.ones(DIM) / DIM ** 0.5

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, DIM, generator=gen) + shift * direction
        return x, (x @ teacher).argmax(dim=1)

    return draw(samples), draw(samples // 2)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


def fisher_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    batch: int = 32) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the log-likelihood per weight (empirical Fisher, per batch)."""
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    batches = 0
    for i in range(0, len(x), batch):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch]).backward()
        for n, p in model.named_parameters():
            fisher[n] += p.grad.detach() ** 2
        batches += 1
    return {n: f / batches for n, f in fisher.items()}


def train_sequence(tasks: dict[str, tuple], epochs: int, ewc_weight: float,
                   batch: int = 32) -> dict:
    """Train on the tasks in order, injecting into one exported program after every epoch."""
    model = make_model()
    x_a, y_a = tasks["A"][1]  # held-out task-A data: what forgetting is measured on
    program = torch.export.export(model, (x_a[:batch],), dynamic_shapes=({0: Dim("batch")},))
    # A program from torch.export shares its tensors with ``model``; the first injection gives
    # it copies of its own, so training never reaches it except through injection. A module
    # built from the program from now on reads the injected weights.
    inject_weights(program, model.state_dict())
    served = program.module()

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    anchors: list[tuple[dict, dict]] = []  # (Fisher, weights) after each finished task
    history = {"task_a_accuracy": [], "epoch_task": []}
    injections = 0
    for name, ((x, y), (x_eval, _)) in tasks.items():
        gen = torch.Generator().manual_seed(len(history["epoch_task"]))
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(batch):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                for fisher, anchor in anchors:
                    loss = loss + ewc_weight / 2 * sum(
                        (fisher[n] * (p - anchor[n]) ** 2).sum()
                        for n, p in model.named_parameters())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            inject_weights(program, model.state_dict())  # same program, no re-export
            injections += 1
            with torch.no_grad():
                for probe in (x_a, x_eval):
                    assert torch.equal(served(probe), model(probe)), "program != eager"
                history["task_a_accuracy"].append(accuracy(served(x_a), y_a))
            history["epoch_task"].append(name)
        if ewc_weight:
            fisher = fisher_diagonal(model, x, y)
            anchors.append((fisher, {n: p.detach().clone() for n, p in model.named_parameters()}))
    after_a = history["task_a_accuracy"][epochs - 1]
    history["forgetting"] = after_a - history["task_a_accuracy"][-1]
    with torch.no_grad():
        history["task_b_accuracy"] = accuracy(served(tasks["B"][1][0]), tasks["B"][1][1])
    history["injections"] = injections
    return history


def plot(results: dict, epochs: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run, label in (("plain", "fine-tuning"), ("ewc", "EWC")):
        acc = results[run]["task_a_accuracy"]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=label)
    ax.axvline(epochs + 0.5, color="grey", linestyle="--", linewidth=1)
    ax.text(epochs + 0.6, 0.05, "task B starts", color="grey")
    ax.set(xlabel="epoch (weights injected into the exported program after each)",
           ylabel="task A accuracy (exported program)", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(epochs: int = 6, samples: int = 1024, ewc_weight: float = 10000.0,
         out: str | Path = "forgetting.png") -> dict:
    """Run fine-tuning and EWC; print, plot to ``out`` and return the per-epoch results."""
    tasks = {"A": make_task(1, 5.0, samples), "B": make_task(2, -5.0, samples)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    try:
        results = {"plain": train_sequence(tasks, epochs, 0.0),
                   "ewc": train_sequence(tasks, epochs, ewc_weight)}
    finally:
        torch.set_num_threads(threads)
    results["injections"] = results["plain"]["injections"] + results["ewc"]["injections"]
    for run in ("plain", "ewc"):
        r = results[run]
        curve = " ".join(f"{a:.2f}" for a in r["task_a_accuracy"])
        print(f"{run:>5}: task A accuracy per epoch [{curve}]  forgetting on task A "
              f"{r['forgetting']:+.3f}  task B accuracy {r['task_b_accuracy']:.2f}")
    print(f"{results['injections']} injections into exported programs, each equal to eager")
    plot(results, epochs, Path(out))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per task")
    parser.add_argument("--samples", type=int, default=1024, help="training samples per task")
    parser.add_argument("--ewc-weight", type=float, default=10000.0)
    parser.add_argument("--out", default="forgetting.png", help="where to write the plot")
    args = parser.parse_args()
    main(args.epochs, args.samples, args.ewc_weight, args.out)
