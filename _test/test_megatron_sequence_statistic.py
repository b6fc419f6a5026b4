"""Megatron-core sequence parallelism with one token per rank: a statistic over the sequence
piece kept with its dim (``x.sum(0, keepdim=True)``, ``x[:1]``) has the piece's shape, so rule 4
cannot tell it from the piece. Megatron's pieces are equal, so every rank sees the same sizes
and refuses alike; the tensor the split layer returned, as it returned it, is still described.
With more tokens than ranks the statistic's shape differs from the piece's and is refused, and
a tensor computed from the piece token by token is joined as the piece, equal to one process.
"""

from __future__ import annotations

import pytest
import torch
from megatron_cases import H, V, megatron_parallel
from parallel_cases import local_group
from rank_pool import distributed
from torch import nn

from flex_surgery import FlexModel, HookFunction
from flex_surgery.hooks.dummy import DummyModule

B = 3
# what the hooked module is handed: the embedding's output itself, a tensor computed from it
# token by token, a sum over the sequence with keepdim, the first token
VARIANTS = ("itself", "scaled", "sum", "first")


class Statistic(nn.Module):
    """An embedding (under TP: reduce-scattered onto the sequence, ``[s / tp, b, h]``) and a
    hook point on ``variant`` of its output; returns ``x + point(...)``."""

    def __init__(self, tp: int, weight: torch.Tensor, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.point = DummyModule()
        if tp == 1:
            self.embed = nn.Embedding(V, H)
            with torch.no_grad():
                self.embed.weight.copy_(weight)
            return
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        config = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=True,
                                     use_cpu_initialization=True, params_dtype=torch.float64)
        self.embed = VocabParallelEmbedding(V, H, init_method=lambda w: w.copy_(weight),
                                            config=config, reduce_scatter_embeddings=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids if not isinstance(self.embed, nn.Embedding) else ids.transpose(0, 1))
        v = self.variant
        p = x if v == "itself" else x * 2.0 if v == "scaled" else \
            x.sum(0, keepdim=True) if v == "sum" else x[:1]
        return x + self.point(p)


def _stored(tp: int, variant: str, seq: int, kind: str) -> tuple[dict, str | None]:
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (B, seq), generator=g)
    model = Statistic(tp, weight, variant)
    stored: dict = {}
    kw = {} if tp > 1 else {"process_group": local_group()}
    try:
        with FlexModel(model, stored, **kw) as flex:
            if kind == "forward":
                flex.register_forward_hook(HookFunction("point"))
            else:
                flex.register_full_backward_hook(HookFunction("point"))
            flex(ids).pow(2).sum().backward()
    except Exception as exc:  # noqa: BLE001 -- a refusal is an answer here
        return stored, str(exc)
    return stored, None


@pytest.mark.parametrize("kind", ["forward", "full_backward"])
@pytest.mark.parametrize("seq", [2, 4], ids=["one_token_per_rank", "two_tokens_per_rank"])
@distributed(world_size=2)
def test_sequence_statistics_refused_and_pieces_equal_tp1(seq, kind):
    import torch.distributed as dist

    for variant in VARIANTS:
        want, err = _stored(1, variant, seq, kind)
        assert err is None, err
        with megatron_parallel(tensor_parallel=2):
            got, err = _stored(2, variant, seq, kind)
        errs = [None, None]
        dist.all_gather_object(errs, err)
        # the statistics have another meaning than a piece: never joined as one
        refused = variant in ("sum", "first") or (seq == 2 and variant == "scaled")
        if refused:
            assert all(e is not None and "'point'" in e for e in errs), (variant, errs)
            continue
        assert errs == [None, None], (variant, errs)
        if dist.get_rank() == 0:
            assert want.keys() == got.keys(), variant
            for key in want:
                # (Megatron initialises the weights in float32)
                torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
