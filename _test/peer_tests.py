"""Running a peer library's own tests against flex_surgery: its wheel, and one pytest run.

A compatibility claim is measured by the peer's own test files, unchanged, run in a separate
pytest process (their packages and conftests must not meet ours). Used by
``test_flexmodel_compat.py`` and ``test_neurosurgeon_compat.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
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
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def run_peer_tests(workdir: Path, files: tuple[str, ...],
                   env: dict[str, str]) -> tuple[dict[str, str], str]:
    """Run the test ``files`` (paths under ``workdir``, which holds their conftest) in a
    separate pytest process: the outcome of each test, ``"module.test" -> "passed" | "failed"
    | "skipped"``, and pytest's output."""
    (workdir / "pytest.ini").write_text("[pytest]\n")
    report = workdir / "report.xml"
    timeout = float(os.environ.get("FLEX_TEST_TIMEOUT", "600"))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(workdir), "-c", str(workdir / "pytest.ini"), f"--junitxml={report}", *files],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
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
