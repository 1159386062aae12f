"""Sphinx configuration: ``sphinx-build -W docs docs/_build/html`` (warnings are errors; CI builds it)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from zmqexecutor import __version__  # noqa: E402

project = "zmqexecutor"
author = "The zmqexecutor developers"
copyright = "2026, The zmqexecutor developers"
release = version = __version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
# Public names only, in the order the source gives them; types as the signatures write them.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"zmqexecutor {release}"
exclude_patterns = ["_build"]
