"""Sphinx configuration for the vig_pyg documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html`` from the repository root.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# Import the package from this checkout even when it is not installed.
sys.path.insert(0, os.path.abspath(".."))

import vig_pyg

project = "vig_pyg"
author = "vig_pyg contributors"
copyright = "vig_pyg contributors"
release = vig_pyg.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# -- MyST (Markdown) -----------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- autodoc / napoleon ------------------------------------------------------------------------------
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"
# Only our own docstrings: PyG and torch base-class methods (message, forward, ...) stay out.
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Keep grouped entries such as "k, dilation, reduce_ratio: ..." together as one item.
napoleon_use_param = False
# PyG-style "Shapes:" sections are rendered as a plain titled block.
napoleon_custom_sections = ["Shapes"]

# -- HTML --------------------------------------------------------------------------------------------
html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = f"vig_pyg {release}"
html_static_path: list[str] = []
