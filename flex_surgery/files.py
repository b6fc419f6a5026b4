"""Files written whole or not at all.

A checkpoint, a store's index or manifest, an exported program: each is written to a temporary
name in the same folder and renamed into place (``os.replace`` is atomic on one file system),
so a reader never sees a half-written file, and a write that fails -- a full disk, Ctrl-C --
leaves whatever the path held before intact and no temporary file behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["write_atomically"]


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary name in ``path``'s folder, then rename it to ``path``;
    on any failure the temporary file is removed and ``path`` is left as it was."""
    final = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(final))
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")  # keeps the suffix
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
