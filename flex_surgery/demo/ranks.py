"""Moved: the demo starts its ranks through :func:`flex_surgery.launch.launch` (``executor="fork"``
by default), which forks them with :func:`flex_surgery.launch.fork_ranks`. This name stays until
``flex_surgery/lens_cli.py`` and ``benchmarks/lens.py`` import ``fork_ranks`` from there.
"""

from flex_surgery.launch.local import fork_ranks

__all__ = ["fork_ranks"]
