"""Launching on a real SLURM cluster.

The main check is a 4-task TP=2 x DP=2 job submitted through submitit: a fairscale model wrapped
in FlexModel, whose stored and edited activations and gradients must equal a one-process run of
the same weights and inputs. Around it: a failing SLURM task is named with its traceback, a
plain ``srun`` script finds its rank with ``init_from_env``, the ``distributed/`` recipe and the
GPU-test runner (on CPU ranks) work against the cluster.

Needs a SLURM cluster (``make test-slurm`` starts one on localhost with
``scripts/slurm/local_cluster.sh``); without one every test here skips and says why.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
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


def _feature_scale() -> torch.Tensor:
    """The edit: scale each hidden feature differently, so both TP shards change differently."""
    return torch.linspace(0.0, 2.0, H)


def tp_dp_rank_body() -> dict:
    """One rank of the TP=2 x DP=2 job: FlexModel hooks on a fairscale tensor-parallel MLP.

    A retrieval hook on the row-parallel ``down`` and an editing hook on the column-parallel
    ``up`` (whose output is sharded over TP); then a backward pass. Returns this rank's weight
    shards, inputs and gradients, so the test can rebuild the one-process model without any
    collective, plus what the hooks stored (rank 0) and the shapes the editing function saw.
    """
    from fairscale.nn.model_parallel import initialize as fs

    from flex_surgery.hooks.hook_function import HookFunction
    from flex_surgery.hooks.wrapper import FlexModel

    fs.initialize_model_parallel(TP)
    torch.manual_seed(0)  # every rank draws the same master weights; fairscale keeps its slice
    model = _TensorParallelMLP()
    dp_rank, tp_rank = fs.get_data_parallel_rank(), fs.get_model_parallel_rank()
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(100 + dp_rank))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    edit_saw: list[tuple[int, ...]] = []

    def scale_features(module, hidden, save_ctx, modules):
        edit_saw.append(tuple(hidden.shape))
        return hidden * _feature_scale()

    stored: dict[str, list[torch.Tensor]] = {}
    flex = FlexModel(model, stored, tensor_parallel_size=TP, data_parallel_size=DP)
    flex.register_forward_hook(HookFunction("up", (None, 3, H), editing_function=scale_features))
    flex.register_forward_hook(HookFunction("down", (None, 3, D)))
    out = flex(x)
    (out**2).sum().backward()
    flex.restore()
    return dict(
        rank=dist.get_rank(), dp_rank=dp_rank, tp_rank=tp_rank, x=x, out=out.detach(),
        stored={k: [t.clone() for t in v] for k, v in stored.items()}, edit_saw=edit_saw,
        state=state, grads={k: p.grad.clone() for k, p in model.named_parameters()},
    )


def _reference(ranks: list[dict], dp_rank: int) -> tuple[nn.Linear, nn.Linear]:
    """The one-process layers, from the shards of the TP group of ``dp_rank``."""
    group = sorted((r for r in ranks if r["dp_rank"] == dp_rank), key=lambda r: r["tp_rank"])
    up, down = nn.Linear(D, H), nn.Linear(H, D)
    with torch.no_grad():
        up.weight.copy_(torch.cat([r["state"]["up.weight"] for r in group], dim=0))
        up.bias.copy_(torch.cat([r["state"]["up.bias"] for r in group], dim=0))
        down.weight.copy_(torch.cat([r["state"]["down.weight"] for r in group], dim=1))
        down.bias.copy_(group[0]["state"]["down.bias"])
    return up, down


def _run_reference(up: nn.Linear, down: nn.Linear, x: torch.Tensor):
    hidden = up(x)
    out = down(nn.functional.gelu(hidden * _feature_scale()))
    (out**2).sum().backward()
    return hidden.detach(), out.detach()


def test_tp2_dp2_flexmodel_job_matches_single_process(tmp_path):
    ranks = launch(tp_dp_rank_body, nprocs=TP * DP, executor="slurm", device="cpu",
                   folder=tmp_path, python_path=[HERE], timeout_min=5)
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    # fairscale orders ranks (dp, pp, tp): TP groups {0,1} and {2,3}.
    assert [(r["dp_rank"], r["tp_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not torch.equal(ranks[0]["x"], ranks[2]["x"])  # DP ranks saw different data
    # The editing function ran once, on rank 0, on the whole hidden activation of both DP
    # batches; hooks stored whole activations on rank 0 only.
    assert [r["edit_saw"] for r in ranks] == [[(4, 3, H)], [], [], []]
    assert [sorted(r["stored"]) for r in ranks] == [["down", "up"], [], [], []]

    hidden_ref, out_ref = [], []
    for dp_rank in range(DP):
        up, down = _reference(ranks, dp_rank)
        x = next(r["x"] for r in ranks if r["dp_rank"] == dp_rank)
        hidden, out = _run_reference(up, down, x)
        hidden_ref.append(hidden)
        out_ref.append(out)
        for r in (r for r in ranks if r["dp_rank"] == dp_rank):
            torch.testing.assert_close(r["out"], out, rtol=1e-5, atol=1e-6)
            rows = slice(r["tp_rank"] * H // TP, (r["tp_rank"] + 1) * H // TP)
            torch.testing.assert_close(r["grads"]["up.weight"], up.weight.grad[rows],
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["grads"]["down.weight"], down.weight.grad[:, rows],
                                       rtol=1e-5, atol=1e-6)
    (stored_up,), (stored_down,) = ranks[0]["stored"]["up"], ranks[0]["stored"]["down"]
    torch.testing.assert_close(stored_up, torch.cat(hidden_ref), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stored_down, torch.cat(out_ref), rtol=1e-5, atol=1e-6)


def _fail_on_rank_one():
    t = torch.ones(1)
    dist.all_reduce(t)
    if dist.get_rank() == 1:
        raise RuntimeError("planted failure in a SLURM task")
    return dist.get_rank(), t.item(), os.environ.get("SLURM_JOB_ID") is not None


def test_slurm_failure_names_the_rank_and_rank0_only_drops_the_rest(tmp_path):
    with pytest.raises(LaunchError) as caught:
        launch(_fail_on_rank_one, nprocs=3, executor="slurm", device="cpu", folder=tmp_path,
               python_path=[HERE], timeout_min=3, rank0_only=True)
    err = caught.value
    assert "planted failure in a SLURM task" in err.failures[1]
    assert list(err.failures) == [1]
    # rank 2 succeeded, but with rank0_only its value was dropped on the rank itself
    assert [(o.rank, o.ok, o.value) for o in err.outcomes] == [
        (0, True, (0, 3.0, True)), (1, False, None), (2, True, None)]


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


def _wait_for_job(job_id: str, timeout_s: float = 180.0) -> str:
    """The final state of a SLURM job (``sbatch --wait`` polls every few seconds; this faster)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                              text=True).stdout
        state = re.search(r"JobState=(\S+)", info)
        if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state.group(1)
        time.sleep(0.3)
    raise TimeoutError(f"SLURM job {job_id} still running after {timeout_s} s")


def test_slurm_recipe_runs_check_cluster(tmp_path):
    """distributed/slurm_submit.sh with cluster.env's settings (2 ranks via the environment)."""
    env = {**os.environ, "FLEX_TASKS_PER_NODE": "2", "FLEX_JOB_DIR": str(tmp_path),
           "FLEX_PYTHON": sys.executable, "FLEX_TIME_MIN": "3"}
    proc = subprocess.run([str(REPO / "distributed" / "slurm_submit.sh"),
                           "distributed/check_cluster.py"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    state = _wait_for_job(job_id)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert state == "COMPLETED", logs
    pattern = r"^rank (\d)/2 on \S+ via srun, backend gloo, device cpu: sum 3$"
    assert sorted(re.findall(pattern, logs, flags=re.M)) == ["0", "1"], logs


def test_gpu_test_runner_collects_every_rank(tmp_path):
    """multi_gpu_tests/run_on_slurm.py, on CPU ranks (--cpu), against this SLURM cluster."""
    env = {**os.environ, "FLEX_JOB_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "multi_gpu_tests" / "run_on_slurm.py"),
                           "--cpu", "--nprocs", "2", "--time-min", "3", "collectives"],
                          env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):  # the CUDA-only test skips on CPU ranks; the other four run
        assert f"rank {rank}: PASS  4 passed, 1 skipped" in proc.stdout, proc.stdout
