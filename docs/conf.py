"""Sphinx configuration: the ignite_tbptt documentation site, built offline from this repository.

    python -m sphinx -W --keep-going -b html docs docs/_build/html      # the site, warnings as errors
    python -m sphinx -W -b doctest docs docs/_build/doctest            # the examples of the pages

The notebooks in ``notebooks/`` are rendered with their saved outputs (never executed here): they are copied
into ``docs/notebooks/`` at the start of each build, because Sphinx reads only files under this folder.
"""

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # document this checkout's ignite_tbptt, installed or not

project = "ignite_tbptt"
author = "the ignite_tbptt developers"
copyright = "2026, the ignite_tbptt developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "notebooks/README.md"]

# MyST: headings get anchors for links between pages; notebooks show their saved outputs and are never run.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
nb_execution_mode = "off"

# API pages: one per public name, with the type hints in the signature, no network lookups (no intersphinx).
autosummary_generate = True
templates_path = ["_templates"]  # class and module pages: the autodoc entries, without summary tables
autosummary_ignore_module_all = False  # a module's page lists its __all__, the names it makes public
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"  # Module, Callable: not ~torch.nn.modules.module.Module
python_use_unqualified_type_names = True
autodoc_preserve_defaults = True  # a default as written (prepare_batch=_prepare_batch), not <function ...>
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Nitpicky for our own references; names of other projects (torch, ignite, typing) are not resolvable offline.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|ignite|numpy|typing|collections|enum|contextlib)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Optional|Union|List|Tuple|Dict|Iterator|Iterable|Mapping|Sequence|Deque|NamedTuple)"),
    (r"py:.*", r"(int|float|str|bool|object|None|type|dict|list|tuple|callable)"),
    (r"py:.*", r"(nn\.Module|Module|Tensor|Engine|Metric|State|EventEnum|MetricUsage|Events|Path|Generator)"),
    (r"py:.*", r"(argparse|os|pathlib|np|numpy)\..*"),
    (r"py:.*", r"(Hidden|ModelFn|Params|BatchDims|ResetFn|Steps|Window|_.*)"),
    (r"py:.*", r".*\._.*|.*_event_filter"),  # private names, and the event filters Ignite's events inherit
]

html_theme = "furo"
html_title = "ignite_tbptt"

# The docstrings' examples run under pytest --doctest-modules; this builder runs the pages' testcode blocks.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import torch
torch.manual_seed(0)
"""


def copy_notebooks(app):
    """The saved notebooks, copied next to the pages so that myst-nb renders them."""
    target = HERE / "notebooks"
    target.mkdir(exist_ok=True)
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copyfile(notebook, target / notebook.name)


def setup(app):
    app.connect("builder-inited", copy_notebooks)
