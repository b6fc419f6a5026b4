"""Sphinx configuration: MyST markdown pages plus the API reference from docstrings.

``make docs`` builds with ``-W``: a broken cross-reference, a malformed docstring or a page left
out of the toctree fails the build, so the docs cannot silently rot.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(".."))

project = "flex_surgery"
author = "flex_surgery contributors"
copyright = "2026, flex_surgery contributors"

from flex_surgery import __version__ as release  # noqa: E402

version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Docstrings are Google style ("Args:", "Returns:"); signatures show type hints.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Optional heavy dependencies are imported lazily by the library; for the docs build they are
# installed (requirements.txt), so nothing is mocked.

html_theme = "alabaster"
# Room for 100-column code lines next to the sidebar.
html_theme_options = {"page_width": "1240px", "sidebar_width": "240px"}
html_title = f"flex_surgery {release}"
html_static_path: list[str] = []


# Guide pages, in reading order. They are written alongside the code they describe and land at
# different times, so the index lists those present (a missing page would fail the -W build),
# and a hidden glob toctree in index.md takes in any page not listed (an orphan would too).
GUIDES = ("hooks", "surgery", "parallel", "pipeline", "launch", "export")


def _list_guides(app, docname: str, source: list[str]) -> None:
    if docname == "index":
        present = [g for g in GUIDES if (Path(app.srcdir) / f"{g}.md").exists()]
        source[0] = source[0].replace("\nGUIDES\n", "\n" + "\n".join(present) + "\n")


def setup(app):
    app.connect("source-read", _list_guides)
