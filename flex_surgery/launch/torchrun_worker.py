"""One torchrun worker of :func:`flex_surgery.launch.launch` (``executor="torchrun"``).

``python -m flex_surgery.launch.torchrun_worker FOLDER`` runs the :class:`RankTask` pickled in
``FOLDER/task.pkl`` and writes its :class:`RankOutcome` to ``FOLDER/rank_<RANK>.pkl``, where the
launching process collects it. The worker exits 0 even when the user's function raised: the
failure travels in the outcome, and torchrun must not tear the other ranks down before they have
written theirs.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path


def main(folder: str) -> None:
    path = Path(folder)
    task = pickle.loads((path / "task.pkl").read_bytes())
    outcome = task()
    tmp = path / f".rank_{os.environ['RANK']}.pkl"
    tmp.write_bytes(pickle.dumps(outcome))
    tmp.rename(path / f"rank_{os.environ['RANK']}.pkl")


if __name__ == "__main__":
    main(sys.argv[1])
