"""Every notebook in ``notebooks/`` runs top to bottom in a fresh kernel; a failing cell fails its test.

The notebooks' own cells assert the claims their text makes, so a run that no longer shows them fails too.
Skipped, with the reason, only where the notebook tooling (``pip install -e ".[notebooks]"``) is missing.
The runs are marked ``notebooks`` (about a minute each on 2 CPU cores); deselect them with ``-m "not notebooks"``.
"""

import importlib.util
import os
import re
from pathlib import Path

import pytest

REASON = 'the notebook tests need nbformat, nbclient, jupytext, ipykernel and matplotlib: pip install -e ".[notebooks]"'
nbformat = pytest.importorskip("nbformat", reason=REASON)
pytest.importorskip("jupytext", reason=REASON)
nbclient = pytest.importorskip("nbclient", reason=REASON)
pytest.importorskip("ipykernel", reason=REASON)
pytest.importorskip("matplotlib", reason=REASON)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def load_build():
    """``notebooks/build.py``, which builds the notebooks and makes their kernels (a script, not a module)."""
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOK_DIR / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


build = load_build()


def kernel_did_not_start(error: BaseException) -> bool:
    """nbclient's failures of a kernel that did not start in time (a loaded machine), as opposed to a cell's
    (an error or a timeout in a cell, which are ``CellControlSignal``\ s)."""
    return isinstance(error, (RuntimeError, TimeoutError, AssertionError)) and not isinstance(
        error, nbclient.exceptions.CellControlSignal
    )


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_fresh(path, tmp_path, monkeypatch):
    """Run from its own folder, as Jupyter opens it, with the package importable and nothing else of the repository."""
    monkeypatch.setenv("MPLBACKEND", "Agg")  # headless: figures render without a display
    monkeypatch.setenv("PYTHONPATH", str(ROOT), prepend=os.pathsep)  # this checkout's ignite_tbptt
    for attempt in (1, 2):  # a kernel that fails to start is retried once; a failing cell fails at once
        nb = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(
            nb, km=build.kernel_manager(tmp_path / f"kernel{attempt}"), kernel_name="python3",
            timeout=build.CELL_TIMEOUT_S, startup_timeout=build.STARTUP_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
        )
        try:
            client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
            return
        except Exception as error:
            if attempt == 2 or not kernel_did_not_start(error):
                raise


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_imports_only_the_package_and_its_folder(path):
    """The runs above put the repository root on the path, which makes ``tests`` importable; a reader's Jupyter,
    with only the package installed, does not: no cell may import from the tests (or the benchmarks)."""
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert not re.search(r"^\s*(from|import)\s+(tests|benchmarks)\b", code, re.M), f"{path.name} imports from tests/"


def test_a_failing_cell_is_not_taken_for_a_kernel_start():
    cell_error = nbclient.exceptions.CellExecutionError("traceback", "ZeroDivisionError", "division by zero")
    assert not kernel_did_not_start(cell_error)
    assert not kernel_did_not_start(nbclient.exceptions.CellTimeoutError("a cell ran past its timeout"))
    assert kernel_did_not_start(AssertionError("assert self.kc is not None"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_notebook_was_executed_without_errors(path):
    """What readers see: every code cell has been run, and none shows an error."""
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    assert all(cell.execution_count for cell in code), f"{path.name} is saved with unexecuted cells"
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} is saved with an error output: {errors[0].ename}: {errors[0].evalue}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_notebook_matches_its_source(path):
    """A notebook built by ``notebooks/build.py`` has the cells of its ``notebooks/src/*.py``: rebuild after edits."""
    source = NOTEBOOK_DIR / "src" / f"{path.stem}.py"
    if not source.exists():
        pytest.skip(f"{path.name} is not built from notebooks/src/")
    expected = [(c.cell_type, c.source) for c in build.cells_of(source)]
    saved = [(c.cell_type, c.source) for c in nbformat.read(path, as_version=4).cells]
    assert saved == expected, f"{path.name} is out of date with {source.relative_to(ROOT)}: python notebooks/build.py"
