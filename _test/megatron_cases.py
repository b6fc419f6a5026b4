"""Megatron-core on CPU in a pool rank: its parallel state set up and torn down around a test
body, and a small model built from Megatron's own tensor-parallel layers with an unsharded twin.

Megatron's ``parallel_state`` is process-global, and a pool rank lives for the whole session, so
every body that initialises it must destroy it in ``finally`` -- :func:`megatron_parallel` does
both. Megatron also calls ``torch.cuda.current_device()`` for the buffers of its sequence-parallel
collectives; on a CPU machine that call is pointed at ``"cpu"`` for the duration.

The model (:class:`MegatronMLP`) is ``VocabParallelEmbedding -> ColumnParallelLinear -> GELU ->
RowParallelLinear``; :func:`megatron_mlp` builds it with the full weights of :func:`plain_mlp`
(Megatron's ``init_method`` receives the *full* master weight and keeps this rank's slice, so
``lambda w: w.copy_(full)`` makes the layers equal an unsharded twin). Activations are
Megatron's ``[sequence, batch, hidden]``; with sequence parallelism the embedding reduce-scatters
its output on the sequence dim, the column layer all-gathers its input from it and the row
layer reduce-scatters its output onto it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

H, FF, V = 8, 32, 16  # hidden, column width, vocabulary
S, B = 4, 3  # sequence, batch (the sequence divides by TP=2 for sequence parallelism)

__all__ = ["B", "FF", "H", "S", "V", "MegatronMLP", "PlainMLP", "megatron_mlp",
           "megatron_parallel", "plain_mlp", "token_ids"]


@contextlib.contextmanager
def megatron_parallel(tensor_parallel: int = 2, pipeline_parallel: int = 1,
                      expert_parallel: int = 1) -> Iterator[None]:
    """Megatron's model-parallel groups over the pool's world, destroyed on exit (always)."""
    from megatron.core import parallel_state

    current_device = torch.cuda.current_device
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"  # Megatron allocates on current_device()
    existing = set(dist.distributed_c10d._world.pg_map)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            expert_model_parallel_size=expert_parallel)
        yield
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        # destroy_model_parallel forgets most of its groups without destroying them; each gloo
        # group keeps its threads and sockets, so a pool rank that lives for the whole session
        # would grow by some twenty groups per body.
        for group in [g for g in dist.distributed_c10d._world.pg_map if g not in existing]:
            dist.destroy_process_group(group)
        torch.cuda.current_device = current_device


def token_ids(seed: int = 1) -> torch.Tensor:
    """Token ids ``[batch, sequence]`` (the embedding turns them into ``[s, b, h]``)."""
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


class PlainMLP(nn.Module):
    """The unsharded twin: ``Embedding -> Linear -> GELU -> Linear`` on ``[s, b, h]``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(V, H)
        self.up = nn.Linear(H, FF)
        self.act = nn.GELU()
        self.down = nn.Linear(FF, H)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids.transpose(0, 1))  # ids [b, s] -> activations [s, b, h]
        return self.down(self.act(self.up(x)))


def plain_mlp(seed: int = 0) -> PlainMLP:
    return PlainMLP(seed)


class MegatronMLP(nn.Module):
    """The same model from Megatron-core's TP layers; returns the row layer's output."""

    def __init__(self, plain: PlainMLP, sequence_parallel: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from megatron.core import ModelParallelConfig, parallel_state
        from megatron.core.tensor_parallel import (
            ColumnParallelLinear,
            RowParallelLinear,
            VocabParallelEmbedding,
        )

        tp = parallel_state.get_tensor_model_parallel_world_size()
        config = ModelParallelConfig(tensor_model_parallel_size=tp,
                                     sequence_parallel=sequence_parallel,
                                     use_cpu_initialization=True, params_dtype=dtype)
        self.sequence_parallel = sequence_parallel

        def full(t: torch.Tensor):
            return lambda w: w.copy_(t.detach().to(w.dtype))

        self.embed = VocabParallelEmbedding(V, H, init_method=full(plain.embed.weight),
                                            config=config,
                                            reduce_scatter_embeddings=sequence_parallel)
        self.up = ColumnParallelLinear(H, FF, config=config, init_method=full(plain.up.weight),
                                       bias=True, gather_output=False)
        self.act = nn.GELU()
        self.down = RowParallelLinear(FF, H, config=config, init_method=full(plain.down.weight),
                                      bias=True, input_is_parallel=True, skip_bias_add=False)
        rank = parallel_state.get_tensor_model_parallel_rank()
        n = FF // tp
        with torch.no_grad():  # Megatron zero-initialises biases
            self.up.bias.copy_(plain.up.bias[rank * n:(rank + 1) * n].to(dtype))
            self.down.bias.copy_(plain.down.bias.to(dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids if self.sequence_parallel else ids.transpose(0, 1))
        h, _ = self.up(x)
        out, _ = self.down(self.act(h))
        return out


def megatron_mlp(plain: PlainMLP | None = None, sequence_parallel: bool = False,
                 dtype: torch.dtype = torch.float32) -> MegatronMLP:
    """Megatron's layers with ``plain``'s weights (call inside :func:`megatron_parallel`)."""
    return MegatronMLP(plain if plain is not None else plain_mlp(), sequence_parallel, dtype)
