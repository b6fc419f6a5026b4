"""Running a peer library's own tests against flex_surgery: its wheel, and one pytest run.

A compatibility claim is measured by the peer's own test files, unchanged, run in a separate
pytest process (their packages and conftests must not meet ours). Used by
``test_flexmodel_compat.py``, ``test_neurosurgeon_compat.py`` and ``test_tuned_lens_compat.py``;
their runs start when the session starts (:func:`start_early`) and their tests read the result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def peer_wheel(requirement: str, cache: Path, pattern: str, source: bool = False) -> Path:
    """The wheel of ``requirement`` (``name==version``), or its source archive (``source``:
    where the tests are not in the wheel), downloaded into ``cache`` the first time; the test
    is skipped, with pip's reason, when no package index is reachable."""
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "--timeout", "20", "--retries", "1", *(["--no-binary", ":all:"] if source else []),
             requirement, "-d", str(cache)],
            capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip download {requirement} timed out: no package index reachable")
    found = sorted(cache.glob(pattern))
    if done.returncode != 0 or not found:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot download {requirement} (no package index reachable?): {reason}")
    return found[0]


def python_env(*front: Path) -> dict[str, str]:
    """This environment with ``front`` (e.g. a pure-Python wheel), then the repository, in
    front of ``PYTHONPATH``."""
    path = [*map(str, front), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run_side_by_side(runs: list[tuple[list[str], dict[str, str]]],
                     timeout_s: float = 300) -> list[str]:
    """Run each ``(command, env)`` of ``runs`` at once and return each one's standard output,
    in order; a run that fails fails the test with its standard error. Most of a probe's time
    is importing torch, so two probes side by side take little more than one."""
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for command, env in runs]
    outputs = []
    try:
        for (command, _), proc in zip(runs, procs):
            out, err = proc.communicate(timeout=timeout_s)
            assert proc.returncode == 0, f"{' '.join(command[1:])} failed:\n{err[-4000:]}"
            outputs.append(out)
    finally:
        for proc in procs:
            _end(proc)
    return outputs


PeerRun = tuple[tuple[str, ...], dict[str, str]]  # the test files, the environment


def run_peer_tests(workdir: Path, prepare: Callable[[Path], PeerRun]) -> tuple[dict[str, str],
                                                                              str]:
    """Run a peer's test files in a separate pytest process: the outcome of each test,
    ``"module.test" -> "passed" | "failed" | "skipped"``, and pytest's output.

    ``prepare(workdir)`` writes the files (the tests, their conftest) into ``workdir`` and
    returns the test files to run and the environment. When the same ``prepare`` was started
    early (:func:`start_early`, at the start of the session), that run's result is taken."""
    early = _EARLY.pop(prepare, None)
    if early is not None:
        proc, workdir = early
        try:
            output, _ = proc.communicate(timeout=_timeout_s())
        finally:
            _end(proc)  # timed out: not left running past its test
        return _outcomes(workdir, output)
    files, env = prepare(workdir)
    done = subprocess.run(_pytest_command(workdir, files), cwd=workdir, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=_timeout_s())
    return _outcomes(workdir, done.stdout)


def start_early(items: list[pytest.Item], workdir: Path) -> None:
    """Start the peer runs of the selected test modules (a module's ``PEER_RUNS``: the
    ``prepare`` functions its tests give :func:`run_peer_tests`) at the lowest CPU priority,
    each in a folder of ``workdir``.

    Such a run spends seconds importing torch and transformers; started when the session
    starts, it uses the cores the rank pools leave idle, and its test only reads the result. A
    run whose preparation fails or skips (no package index) is not started: its test prepares
    it again and reports why."""
    modules = {id(item.module): item.module for item in items
               if isinstance(item, pytest.Function)}
    _EARLY_FOLDERS.append(workdir)
    for module in modules.values():
        for prepare in getattr(module, "PEER_RUNS", ()):
            folder = workdir / f"{module.__name__}.{prepare.__name__}"
            folder.mkdir(parents=True)
            try:
                files, env = prepare(folder)
            except (Exception, pytest.skip.Exception):  # noqa: BLE001 - the test reports it
                continue
            _EARLY[prepare] = (subprocess.Popen(
                ["nice", "-n", "19", *_pytest_command(folder, files)], cwd=folder, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), folder)


def stop_early() -> None:
    """End the early runs no test collected (a session stopped early); remove their folders."""
    while _EARLY:
        _end(_EARLY.popitem()[1][0])
    while _EARLY_FOLDERS:
        shutil.rmtree(_EARLY_FOLDERS.pop(), ignore_errors=True)


# prepare -> (the early run's process, its folder)
_EARLY: dict[Callable[[Path], PeerRun], tuple[subprocess.Popen, Path]] = {}
_EARLY_FOLDERS: list[Path] = []


def _end(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs, and reap it (its pipes read to the end)."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _timeout_s() -> float:
    return float(os.environ.get("FLEX_TEST_TIMEOUT", "600"))


def _pytest_command(workdir: Path, files: tuple[str, ...]) -> list[str]:
    (workdir / "pytest.ini").write_text("[pytest]\n")
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
            str(workdir), "-c", str(workdir / "pytest.ini"),
            f"--junitxml={workdir / 'report.xml'}", *files]


def _outcomes(workdir: Path, output: str) -> tuple[dict[str, str], str]:
    report = workdir / "report.xml"
    assert report.exists(), f"the peer's tests did not run:\n{output[-4000:]}"
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        outcome = "failed" if failed else "skipped" if skipped else "passed"
        outcomes[f"{module}.{case.get('name')}"] = outcome
    return outcomes, output


def report(what: str, target: str, outcomes: dict[str, str]) -> list[str]:
    """Print the score line the docs quote (``<what> on <target>: N passed, M not: [...]``) and
    return the tests that did not pass."""
    not_passed = sorted(t for t, o in outcomes.items() if o != "passed")
    print(f"{what} on {target}: {len(outcomes) - len(not_passed)} passed, "
          f"{len(not_passed)} not: {not_passed}")
    return not_passed
