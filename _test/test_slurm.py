"""A real SLURM job through submitit: a 4-task TP=2 x DP=2 fairscale model whose hooked activations
must equal a single-process run of the same weights and inputs.

Needs a SLURM cluster (``make test-slurm`` starts one on localhost with
``scripts/slurm/local_cluster.sh``); without one every test here skips and says why.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flex_surgery.launch import LaunchError, launch
from flex_surgery.launch.launcher import PACKAGE_ROOT

HERE = str(Path(__file__).resolve().parent)
REPO = Path(__file__).resolve().parent.parent
D, H, TP, DP = 8, 16, 2, 2


def _slurm_unavailable() -> str | None:
    """Why SLURM tests cannot run here, or None when a node answers."""
    state_dir = Path(os.environ.get("FLEX_SLURM_DIR", "/tmp/flex_surgery_slurm"))
    note = state_dir / "unavailable"
    if note.exists():
        return f"local SLURM cluster unavailable: {note.read_text().strip()}"
    if shutil.which("sbatch") is None:
        return "no SLURM client on PATH (run `make test-slurm`, which starts a local cluster)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                timeout=10).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        return f"no usable SLURM node (sinfo states: {states or 'none'})"
    return None


_REASON = _slurm_unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(autouse=True)
def _quiet_submitit():
    # Without slurmdbd, submitit warns on every poll that sacct is unavailable.
    logging.getLogger("submitit").setLevel(logging.ERROR)


class _TensorParallelMLP(nn.Module):
    """fairscale's Megatron pair: column-parallel up (output sharded), row-parallel down."""

    def __init__(self) -> None:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        self.up = ColumnParallelLinear(D, H, gather_output=False)
        self.act = nn.GELU()
        self.down = RowParallelLinear(H, D, input_is_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def tp_dp_rank_body() -> dict:
    """One rank of the TP=2 x DP=2 job: forward with a hook on the column-parallel layer.

    Returns this rank's weight shards and inputs, so the test can rebuild the one-process model
    without any collective, plus the whole hidden activation the hook saw (gathered over the
    tensor-parallel group) and the model output.
    """
    from fairscale.nn.model_parallel import initialize as fs

    fs.initialize_model_parallel(TP)
    torch.manual_seed(0)  # every rank draws the same master weights; fairscale keeps its slice
    model = _TensorParallelMLP()
    dp_rank, tp_rank = fs.get_data_parallel_rank(), fs.get_model_parallel_rank()
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(100 + dp_rank))
    seen: list[torch.Tensor] = []
    handle = model.up.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        out = model(x)
    handle.remove()
    pieces = [torch.empty_like(seen[0]) for _ in range(TP)]
    dist.all_gather(pieces, seen[0].contiguous(), group=fs.get_model_parallel_group())
    return dict(
        rank=dist.get_rank(), dp_rank=dp_rank, tp_rank=tp_rank, x=x, out=out,
        hidden=torch.cat(pieces, dim=-1), local_hidden_shape=tuple(seen[0].shape),
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
    )


def _reference(ranks: list[dict], dp_rank: int) -> nn.Sequential:
    """The one-process model, from the shards of the TP group of ``dp_rank``."""
    group = sorted((r for r in ranks if r["dp_rank"] == dp_rank), key=lambda r: r["tp_rank"])
    up, down = nn.Linear(D, H), nn.Linear(H, D)
    up.weight.data = torch.cat([r["state"]["up.weight"] for r in group], dim=0)
    up.bias.data = torch.cat([r["state"]["up.bias"] for r in group], dim=0)
    down.weight.data = torch.cat([r["state"]["down.weight"] for r in group], dim=1)
    down.bias.data = group[0]["state"]["down.bias"]
    return nn.Sequential(up, nn.GELU(), down)


def test_tp2_dp2_job_matches_single_process(tmp_path):
    ranks = launch(tp_dp_rank_body, nprocs=TP * DP, executor="slurm", device="cpu",
                   folder=tmp_path, python_path=[HERE], timeout_min=5)
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    # fairscale orders ranks (dp, pp, tp): TP groups {0,1} and {2,3}.
    assert [(r["dp_rank"], r["tp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not torch.equal(ranks[0]["x"], ranks[2]["x"])  # DP ranks saw different data
    for r in ranks:
        assert r["local_hidden_shape"] == (2, 3, H // TP)  # the hook really saw a shard
        ref = _reference(ranks, r["dp_rank"])
        with torch.no_grad():
            hidden, out = ref[0](r["x"]), ref(r["x"])
        torch.testing.assert_close(r["hidden"], hidden, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["out"], out, rtol=1e-5, atol=1e-6)


def _fail_on_rank_one():
    t = torch.ones(1)
    dist.all_reduce(t)
    if dist.get_rank() == 1:
        raise RuntimeError("planted failure in a SLURM task")
    return dist.get_rank(), t.item(), os.environ.get("SLURM_JOB_ID") is not None


def test_slurm_failure_names_the_rank(tmp_path):
    with pytest.raises(LaunchError) as caught:
        launch(_fail_on_rank_one, nprocs=2, executor="slurm", device="cpu", folder=tmp_path,
               python_path=[HERE], timeout_min=3)
    assert caught.value.results == [(0, 2.0, True), None]
    assert "planted failure in a SLURM task" in caught.value.failures[1]


def test_init_from_env_under_plain_srun():
    """A script started by ``srun`` (no submitit) finds its rank with init_from_env."""
    code = (
        "import torch, torch.distributed as dist\n"
        "from flex_surgery.launch import init_from_env\n"
        "env = init_from_env('cpu')\n"
        "t = torch.tensor([float(env.rank + 1)]); dist.all_reduce(t)\n"
        "print('RESULT', env.launcher, env.rank, env.world_size, dist.get_backend(), t.item())\n"
    )
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    proc = subprocess.run(["srun", "-n2", "--time=3", sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert lines == ["RESULT srun 0 2 gloo 3.0", "RESULT srun 1 2 gloo 3.0"]
