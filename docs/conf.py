"""Sphinx configuration of the tensorly-dataaware documentation.

Build (from the repository root)::

    python -m sphinx -W -b html docs docs/_build/html

The gallery examples in ``docs/examples`` are executed during the build (sphinx-gallery
caches them: an unchanged example is not re-run on the next build).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")
# One BLAS thread: the examples use small matrices, for which extra threads mostly spin
# and wait on a shared machine (measured: 10x slower with 2 threads under load).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import tensorly_dataaware  # noqa: E402

# -- Project ------------------------------------------------------------------------------

project = "tensorly-dataaware"
author = "the tensorly-dataaware developers"
copyright = "2025, the tensorly-dataaware developers"
release = tensorly_dataaware.__version__
version = ".".join(release.split(".")[:2])

# -- Extensions ---------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

try:  # Markdown (benchmarks/RESULTS.md) is rendered when myst-parser is installed,
    import myst_parser  # noqa: F401  # and included verbatim otherwise.

    extensions.append("myst_parser")
    HAVE_MYST = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_MYST = False

# No intersphinx: the documentation must build without network access.

templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "README.md",
    "requirements.txt",
    "examples/*",
    "_generated",
]
source_suffix = {".rst": "restructuredtext"}
if HAVE_MYST:
    source_suffix[".md"] = "markdown"
    # RESULTS.md is written by hand outside docs/: tolerate its relative links and heading
    # levels rather than failing the -W build on them.
    suppress_warnings = ["myst.header", "myst.xref_missing"]
    myst_enable_extensions = ["dollarmath"]

root_doc = "index"
default_role = "literal"
pygments_style = "sphinx"

# -- autodoc / autosummary / numpydoc -----------------------------------------------------

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"member-order": "bysource"}
autodoc_inherit_docstrings = False  # torch.nn.Module.forward's text is not ours
autodoc_typehints = "none"  # numpydoc sections carry the types
autodoc_mock_imports: list[str] = []

numpydoc_show_class_members = False  # members are listed by our autosummary class template
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

# -- sphinx-gallery -----------------------------------------------------------------------

sphinx_gallery_conf = {
    "examples_dirs": ["examples"],
    "gallery_dirs": ["auto_examples"],
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "reference_url": {"tensorly_dataaware": None},
    "matplotlib_animations": False,
    "capture_repr": ("_repr_html_", "__repr__"),
    "show_memory": False,
    "min_reported_time": 1,
    # Cross-links from the API pages to the examples that use each object.
    "doc_module": ("tensorly_dataaware",),
    "backreferences_dir": "generated/backreferences",
}

# -- HTML ---------------------------------------------------------------------------------

try:
    import pydata_sphinx_theme  # noqa: F401

    html_theme = "pydata_sphinx_theme"
    html_theme_options = {
        "navigation_with_keys": False,
        "show_toc_level": 2,
        "navbar_align": "left",
    }
except ImportError:  # pragma: no cover - fall back to Sphinx's built-in theme
    html_theme = "alabaster"
    html_theme_options = {}

html_title = f"tensorly-dataaware {release}"
html_static_path = ["_static"]
html_show_sourcelink = False

# -- Benchmarks page: include what the benchmark scripts have produced --------------------

BENCH = ROOT / "benchmarks"
RESULTS_MD = BENCH / "RESULTS.md"
EXPECTED_PLOTS = [
    ("accuracy_vs_params.png", "Test accuracy against the fraction of parameters kept, sigma vs Frobenius."),
    ("sigma_error_per_layer.png", "Relative sigma-error of every compressed layer, sigma vs Frobenius."),
    ("solver_time.png", "Solver wall time against layer size."),
]
RESULTS_MARKER = ".. benchmark-results::"
PLOTS_MARKER = ".. benchmark-plots::"


GENERATED = DOCS / "_generated"
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
_HTML_SRC = re.compile(r"""(<img\b[^>]*\bsrc=["'])([^"']+)(["'])""")


def _rebase(target: str) -> str:
    """Make a link of RESULTS.md (relative to benchmarks/) relative to docs/ instead."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("/", "#")):
        return target  # URL, absolute path or anchor
    path, sep, anchor = target.partition("#")
    rebased = os.path.relpath(BENCH / path, DOCS).replace(os.sep, "/")
    return rebased + sep + anchor


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def _results_block() -> str:
    if not RESULTS_MD.is_file():
        return (
            ".. note::\n\n"
            "   ``benchmarks/RESULTS.md`` has not been written yet in this checkout; the\n"
            "   measured tables appear here once it exists.\n"
        )
    if not HAVE_MYST:
        rel = os.path.relpath(RESULTS_MD, DOCS).replace(os.sep, "/")
        return f".. include:: {rel}\n   :literal:\n"
    # The include directive resolves images and links relative to docs/benchmarks.rst, but
    # RESULTS.md writes them relative to benchmarks/: rewrite them in a generated copy.
    text = RESULTS_MD.read_text(encoding="utf-8")
    text = _LINK.sub(lambda m: m.group(1) + _rebase(m.group(2)) + m.group(3), text)
    text = _HTML_SRC.sub(lambda m: m.group(1) + _rebase(m.group(2)) + m.group(3), text)
    _write_if_changed(GENERATED / "benchmark_results.md", text)
    return ".. include:: _generated/benchmark_results.md\n   :parser: myst_parser.sphinx_\n"


def _plots_block() -> str:
    lines = []
    for name, caption in EXPECTED_PLOTS:
        path = BENCH / "plots" / name
        if path.is_file():
            rel = os.path.relpath(path, DOCS).replace(os.sep, "/")
            lines += [f".. figure:: {rel}", "   :width: 90%", "", f"   {caption}", ""]
    if not lines:
        return (
            ".. note::\n\n"
            "   No plot in ``benchmarks/plots/`` yet: run ``python benchmarks/plots.py``\n"
            "   after the benchmarks, then rebuild the documentation.\n"
        )
    return "\n".join(lines)


def _fill_benchmarks(app, docname, source):
    if docname != "benchmarks":
        return
    text = source[0]
    text = text.replace(RESULTS_MARKER, _results_block())
    text = text.replace(PLOTS_MARKER, _plots_block())
    source[0] = text


def _always_reread_benchmarks(app, env, added, changed, removed):
    # The page depends on files outside docs/ that may appear later (plots): re-read it.
    return ["benchmarks"] if "benchmarks" in env.found_docs else []


def setup(app):
    app.connect("source-read", _fill_benchmarks)
    app.connect("env-get-outdated", _always_reread_benchmarks)
