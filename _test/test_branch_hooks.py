"""Hooks on a branch that some data-parallel ranks skip (a branch taken on the data).

Each data-parallel rank runs the model on its own rows; a model that runs a module only when
some row asks for it (``if take.any():``) runs it on some ranks only. A hook there fired on the
ranks that took the branch, and its gather met the gather of the next hook on the others: the
stored value was this rank's rows of one module joined with another rank's rows of another
module, without a word. The exchange of shapes in front of every gather over data parallelism
carries the hook site (``flex_surgery.parallel.site_tags``), so every rank raises
``HookSiteMismatchError`` at that call; the same FlexModel then goes on working.
"""

import pytest
import torch
import torch.distributed as dist
from parallel_cases import H, column_like, local_group, row_like, seeded_linear
from rank_pool import distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

# imported here, before the rank pools fork, so that no rank imports them in a body
from flex_surgery.hooks import FlexModel, HookFunction
from flex_surgery.parallel.site_tags import HookSiteMismatchError

TOL = dict(rtol=1e-9, atol=1e-12)
FF = 8


class BranchyNet(nn.Module):
    """``side`` runs on the rows whose first feature is positive, and not at all when there is
    none. ``up`` and ``down`` stand for the rest of the model; ``up``'s output has ``side``'s
    shape, so a gather of one met by the other's would fit."""

    def __init__(self, up: nn.Module | None = None, down: nn.Module | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.first = seeded_linear(H, H, g)
        self.side = seeded_linear(H, H, g)
        self.up = up if up is not None else seeded_linear(H, FF, g)
        self.down = down if down is not None else seeded_linear(FF, H, g)

    def forward(self, x):
        take = x[:, 0, 0] > 0
        x = self.first(x)
        if take.any():
            x = torch.where(take[:, None, None], x + self.side(x), x)
        return self.down(torch.relu(self.up(x)))


def _inputs(taken_by_all: bool) -> torch.Tensor:
    x = torch.randn(4, 3, H, generator=torch.Generator().manual_seed(1))
    x[:, 0, 0] = 5.0
    if not taken_by_all:
        x[2:, 0, 0] = -5.0  # the second half of the batch (rank 1's rows) skips the branch
    return x


def _rows(x: torch.Tensor, replica: int, replicas: int = 2) -> torch.Tensor:
    n = x.shape[0] // replicas
    return x[replica * n:(replica + 1) * n]


def _double(module, tensor, ctx, modules):
    return tensor * 2


MODES = {
    "retrieve": {},
    "edit": dict(editing_function=_double),
    "replicate_edit": dict(editing_function=_double, replicate_edit=True),
    "expected_shape": dict(expected_shape=(None, 3, H)),
}


def _register(flex: FlexModel, prefix: str, mode: str, up_shape=(None, 3, FF)) -> None:
    options = MODES[mode]
    flex.register_forward_hook(HookFunction(prefix + "side", **options))
    up = dict(options, expected_shape=up_shape) if "expected_shape" in options else options
    flex.register_forward_hook(HookFunction(prefix + "up", **up))


def _reference(mode: str) -> tuple[dict, torch.Tensor]:
    stored = {}
    with FlexModel(BranchyNet(), stored, process_group=local_group()) as flex:
        _register(flex, "", mode)
        with torch.no_grad():
            out = flex(_inputs(taken_by_all=True))
    return stored, out


@distributed(world_size=2)
def test_a_hook_some_replicas_skip_raises_on_every_rank_then_the_model_goes_on():
    """Retrieval (the leader's point-to-point path), the leader's edit and the replicated edit
    (the all-gather of the sizes), and ``expected_shape`` (the agreement on the whole shape),
    under FlexModel's own data parallelism and under DDP: every rank raises at ``side``'s
    call; then, with every rank taking the branch, the same FlexModel equals one process."""
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    for mode in MODES:
        want, want_out = _reference(mode)
        for wrap in (False, True):
            model = DDP(BranchyNet()) if wrap else BranchyNet()
            stored = {}
            with FlexModel(model, stored) as flex:
                _register(flex, "module." if wrap else "", mode)
                with torch.no_grad(), pytest.raises(HookSiteMismatchError) as refused:
                    flex(_rows(_inputs(taken_by_all=False), rank))
                if rank == 0:
                    assert "side'" in str(refused.value), str(refused.value)
                stored.clear()
                with torch.no_grad():
                    out = flex(_rows(_inputs(taken_by_all=True), rank))
            torch.testing.assert_close(out, _rows(want_out, rank), **TOL)
            if rank == 0:
                got = {k.removeprefix("module."): v for k, v in stored.items()}
                assert got.keys() == want.keys(), (mode, wrap, sorted(got))
                for k in want:
                    torch.testing.assert_close(got[k], want[k], **TOL)


@distributed(world_size=4)
def test_dp_x_tp_a_hook_some_replicas_skip_raises_on_every_rank():
    """fairscale TP=2 x DP=2: replica 0 takes the branch, replica 1 does not. The leader's
    collection over the stage (tp and dp in one transfer) and the edit's walk over the axes
    meet ``side`` on replica 0 and the column-parallel ``up`` on replica 1: every rank raises."""
    from fairscale.nn.model_parallel import initialize as fs

    torch.set_default_dtype(torch.float64)
    fs.initialize_model_parallel(2)
    plain = BranchyNet()
    model = BranchyNet(column_like(plain.up), row_like(plain.down))
    replica = fs.get_data_parallel_rank()
    for mode in ("retrieve", "edit", "replicate_edit"):
        want, want_out = _reference(mode)
        stored = {}
        with FlexModel(model, stored, tensor_parallel_size=2, data_parallel_size=2) as flex:
            _register(flex, "", mode)
            with torch.no_grad(), pytest.raises(HookSiteMismatchError):
                flex(_rows(_inputs(taken_by_all=False), replica))
            stored.clear()
            with torch.no_grad():
                out = flex(_rows(_inputs(taken_by_all=True), replica))
        torch.testing.assert_close(out, _rows(want_out, replica), **TOL)
        if dist.get_rank() == 0:
            assert stored.keys() == want.keys(), (mode, sorted(stored))
            for k in want:
                torch.testing.assert_close(stored[k], want[k], **TOL)
