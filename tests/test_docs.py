"""The documentation's code runs as written.

* Every docstring example of the package (``>>>`` lines, checked by :mod:`doctest`).
* Every Python code block of the README and of the Sphinx pages, in order, in one namespace
  per document (later blocks use the names earlier ones define, as a reader would run
  them), in a temporary working directory (blocks write files such as
  ``resnet20_small.pt``).

A block that raises fails the test with the block's number and source; nothing is
substituted, so a renamed function, a missing import or an undefined name in the docs is
caught here.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import textwrap
from pathlib import Path

import pytest
import tensorly as tl

import tensorly_dataaware

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", "docs/quickstart.rst", "docs/index.rst"]
OPTIONAL_DEPENDENCIES = {"torch", "jax", "jaxlib", "onnx", "onnxruntime", "tltorch", "matplotlib"}


def _module_names() -> list[str]:
    names = [tensorly_dataaware.__name__]
    # onerror: a subpackage whose optional dependency is missing (torch) is listed without
    # its submodules; the test of that name then skips.
    for info in pkgutil.walk_packages(
        tensorly_dataaware.__path__, prefix=f"{tensorly_dataaware.__name__}.", onerror=lambda name: None
    ):
        names.append(info.name)
    return sorted(names)


def python_blocks(path: Path) -> list[str]:
    """The Python code blocks of a Markdown (```` ```python ````) or reST
    (``.. code-block:: python``) document, dedented, in document order."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    blocks = []
    # A reST block: the directive, one blank line, then every following line that is blank
    # or indented (the block ends at the first line that is neither).
    for match in re.finditer(r"^\.\. code-block:: python\n\n((?:(?:[ \t]+.*)?\n)+)", text, flags=re.M):
        blocks.append(textwrap.dedent(match.group(1)))
    return blocks


@pytest.fixture
def _numpy_backend():
    """The examples are written for NumPy and may switch TensorLy's backend: run them on
    NumPy and give the caller's backend back afterwards."""
    before = tl.get_backend()
    tl.set_backend("numpy")
    yield
    tl.set_backend(before)


@pytest.mark.parametrize("module_name", _module_names())
def test_docstring_examples(module_name, _numpy_backend, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only a missing optional dependency skips; a broken import of our own fails.
        if (error.name or "").split(".")[0] not in OPTIONAL_DEPENDENCIES:
            raise
        pytest.skip(f"{module_name} needs {error.name}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} docstring examples of {module_name} failed (output above)"


def test_python_blocks_are_found():
    """The extraction itself: a document whose examples are missed would pass vacuously."""
    counts = {name: len(python_blocks(ROOT / name)) for name in DOCUMENTS}
    assert all(count > 0 for count in counts.values()), counts
    # Every "```python" fence of the README is a block (an unterminated or oddly indented
    # one would be silently skipped by the pattern above).
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert counts["README.md"] == len(re.findall(r"^```python$", readme, flags=re.M))


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCUMENTS)
def test_documented_python_runs(document, _numpy_backend, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for number, source in enumerate(python_blocks(ROOT / document)):
        try:
            exec(compile(source, f"{document}, Python block {number}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - reported with the block that raised
            pytest.fail(f"{document}, Python block {number} raised {type(error).__name__}: {error}\n\n{source}")
