"""Find the circuit of a tiny ViT for a synthetic task, in one process; the patch embedding is a
``Conv2d``, masked like any linear layer.

The task: is the mean of the *red* channel of a random 32x32 image positive? A tiny random ViT
with a linear classifier on its CLS token is trained densely on it first; then a
:class:`~flex_surgery.surgery.circuits.CircuitModel` masks the patch embedding, the first
block's MLP and the classifier. The circuit keeps a small fraction of the weights, still solves
the task, and the patch-embedding weights it keeps read mostly the red channel.

    python docs/examples/circuit_vit.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from flex_surgery.models import tiny_hf_model
from flex_surgery.surgery.circuits import CircuitConfig, CircuitModel, anneal_temperature

TARGETS = ["vit.embeddings.patch_embeddings.projection", "vit.layers.0.mlp.fc1",
           "vit.layers.0.mlp.fc2", "classifier"]


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vit = tiny_hf_model("vit")
        self.classifier = nn.Linear(self.vit.config.hidden_size, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.vit(pixel_values=pixel_values).last_hidden_state[:, 0])


def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(n, 3, 32, 32, generator=gen) + torch.randn(n, 3, 1, 1, generator=gen)
    return x, (x[:, 0].mean((1, 2)) > 0).long()


def example(dense_steps: int = 60, steps: int = 40, epochs: int = 4, batch: int = 128) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = Classifier().train()
    x, y = task(batch, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(dense_steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    xt, yt = task(512, seed=2)
    with torch.no_grad():
        dense_accuracy = (model.eval()(xt).argmax(-1) == yt).float().mean().item()

    circuit = CircuitModel(CircuitConfig(
        mask_hparams=dict(ablation="none", mask_unit="weight", mask_bias=False,
                          mask_init_value=0.5),
        target_layers=TARGETS, l0_lambda=1e-3), model)
    opt = torch.optim.Adam(circuit.mask_logits.parameters(), lr=0.05)
    per_epoch, history = steps // epochs, []
    for step in range(steps):
        loss = F.cross_entropy(circuit(x), y) + circuit.config.l0_lambda * circuit.l0_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % per_epoch == 0:
            anneal_temperature(circuit, (step + 1) // per_epoch, epochs, final_temperature=200.0)
        history.append(circuit.compute_l0_statistics()["total_l0"])

    circuit.eval()
    with torch.no_grad():
        accuracy = (circuit(xt).argmax(-1) == yt).float().mean().item()
        circuit.set_ablate_mode("zero_ablate")             # everything but the circuit
        ablated = (circuit(xt).argmax(-1) == yt).float().mean().item()
        circuit.set_ablate_mode("none")
    patch = circuit.hard_masks()[f"{TARGETS[0]}.weight"]   # [64, 3, 8, 8]
    stats = circuit.compute_l0_statistics()
    return dict(dense_accuracy=dense_accuracy, accuracy=accuracy, ablated_accuracy=ablated,
                l0=stats["total_l0"], max_l0=stats["max_l0"],
                patch_weights_per_channel=patch.sum((0, 2, 3)).tolist(),
                history=history, seconds=time.perf_counter() - start)


if __name__ == "__main__":
    out = example()
    print(f"dense accuracy {out['dense_accuracy']:.3f}  circuit accuracy {out['accuracy']:.3f} "
          f"(ablated: {out['ablated_accuracy']:.3f})  "
          f"L0 {out['l0']:.0f} of {out['max_l0']}  patch-embedding weights kept per channel "
          f"(R, G, B) {out['patch_weights_per_channel']}  ({out['seconds']:.1f} s)")
