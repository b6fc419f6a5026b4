"""tuned-lens 0.2.0's own model-surgery tests, unchanged, run against flex_surgery.

tuned-lens's tests are in its source archive (``tuned-lens==0.2.0``), not in its wheel. This
test downloads the archive once into ``.cache/tuned-lens-0.2.0/`` (skipped, with pip's reason,
when no package index is reachable), extracts ``tests/`` (``conftest.py``, ``__init__.py``,
``test_model_surgery.py``) byte for byte and runs ``test_model_surgery.py`` in a separate pytest
process, with ``tuned_lens.model_surgery`` being :mod:`flex_surgery.surgery.model_surgery`. The
configs and ``datasets`` those tests need come from ``tuned_lens_compat_conftest.py``, copied
in as the root ``conftest.py``. ``TUNED_LENS_COMPAT_TARGET=tuned_lens`` runs the same tests
against tuned-lens's own ``tuned_lens/model_surgery.py`` (its package ``__init__``, which
imports the lens and its training dependencies, left out), which must pass them all too: the
proof that the harness is fair.

Two more checks run tuned-lens's own code beside ours: its model-surgery context managers
against ours on a tiny GPT-2 (``tuned_lens_compat_probe.py``), and its ``TunedLens`` against
flex_surgery's lens given the same translators (``tuned_lens_translator_check.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from peer_tests import REPO, peer_wheel, python_env, report, run_peer_tests, run_side_by_side

REQUIREMENT = "tuned-lens==0.2.0"
CACHE = Path(os.environ.get("TUNED_LENS_SDIST_CACHE", REPO / ".cache" / "tuned-lens-0.2.0"))
CONFTEST = Path(__file__).resolve().parent / "tuned_lens_compat_conftest.py"
AGAINST_TUNED_LENS = os.environ.get("TUNED_LENS_COMPAT_TARGET") == "tuned_lens"

TEST_FILE = "tests/test_model_surgery.py"
FROM_THE_ARCHIVE = ("tests/__init__.py", "tests/conftest.py", TEST_FILE)
SHIM = "from flex_surgery.surgery.model_surgery import *  # noqa: F403\n"


def _workdir(workdir: Path, theirs_module: bool) -> Path:
    """``workdir`` holding tuned-lens's tests and a ``tuned_lens`` package whose
    ``model_surgery`` is tuned-lens's own (``theirs_module``) or flex_surgery's."""
    archive_path = peer_wheel(REQUIREMENT, CACHE, "tuned-lens-0.2.0.tar.gz", source=True)
    wanted = {f"tuned-lens-0.2.0/{name}": name for name in FROM_THE_ARCHIVE}
    theirs = "tuned-lens-0.2.0/tuned_lens/model_surgery.py"
    with tarfile.open(archive_path) as archive:
        files = {name: archive.extractfile(member).read()
                 for member in archive.getmembers()
                 if (name := wanted.get(member.name))}
        module = archive.extractfile(theirs).read() if theirs_module else SHIM.encode()
    files.update({"tuned_lens/__init__.py": b"", "tuned_lens/model_surgery.py": module})
    for name, data in files.items():
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    shutil.copy(CONFTEST, workdir / "conftest.py")
    return workdir


def _prepare(workdir: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """tuned-lens's test file and its package in ``workdir``: the files to run, the env."""
    _workdir(workdir, AGAINST_TUNED_LENS)
    return (TEST_FILE,), python_env()


PEER_RUNS = (_prepare,)  # started when the session starts (peer_tests)


def test_tuned_lens_0_2_0_model_surgery_tests_pass_on_flex_surgery(tmp_path):
    outcomes, output = run_peer_tests(tmp_path, _prepare)
    target = "tuned-lens 0.2.0 itself" if AGAINST_TUNED_LENS else "flex_surgery"
    not_passed = report("tuned-lens 0.2.0's model-surgery tests", target, outcomes)
    assert len(outcomes) == 13, f"tuned-lens's test file holds other tests: {sorted(outcomes)}"
    assert not not_passed, output[-6000:]


def _probes(*workdirs: Path) -> list[dict]:
    """The probe's answers with each of ``workdirs`` in front of the path, the processes run
    side by side (most of each one's time is importing torch and transformers)."""
    probe = str(Path(__file__).parent / "tuned_lens_compat_probe.py")
    outputs = run_side_by_side([([sys.executable, probe], python_env(w)) for w in workdirs])
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def test_context_managers_do_what_tuned_lens_0_2_0_does(tmp_path):
    """delete / permute (with drops and repeats) / replace / assign_key_path / set_key_path_ /
    permute_layers_ on a tiny GPT-2: the same logits inside, the same model after, the same
    objects handed back, as tuned-lens's own module."""
    theirs, ours = _probes(_workdir(tmp_path / "tuned_lens", theirs_module=True),
                           _workdir(tmp_path / "flex_surgery", theirs_module=False))
    assert theirs["layers"] == [3, True] and theirs["delete_1"][:2] == [True, 2]
    assert len({theirs["base"], theirs["delete_1"][2], theirs["drop"][2]}) == 3
    for key, value in theirs.items():
        assert ours[key] == value, key


def test_a_tuned_lens_plugs_into_the_lens_as_translators(tmp_path):
    """docs/lens.md: a trained ``tuned_lens.TunedLens`` plugs in as ``{i: tuned[i + 1]}``;
    tuned-lens's own package (from its archive) decodes, and flex_surgery's lens must agree."""
    archive_path = peer_wheel(REQUIREMENT, CACHE, "tuned-lens-0.2.0.tar.gz", source=True)
    with tarfile.open(archive_path) as archive:
        for member in archive.getmembers():
            name = member.name.removeprefix("tuned-lens-0.2.0/")
            if name.startswith("tuned_lens/") and member.isfile():
                target = tmp_path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
    check = Path(__file__).parent / "tuned_lens_translator_check.py"
    done = subprocess.run([sys.executable, str(check)], env=python_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "3 blocks equal" in done.stdout
