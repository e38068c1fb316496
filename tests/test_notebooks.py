"""Every notebook in ``notebooks/`` runs top to bottom in a fresh kernel; a failing cell fails its test.

The notebooks' own cells assert the claims their text makes, so a run that no longer shows them fails too.
Skipped, with the reason, only where the notebook tooling (``pip install -e ".[notebooks]"``) is missing.
The runs are marked ``notebooks`` (about a minute each on 2 CPU cores); deselect them with ``-m "not notebooks"``.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

REASON = 'the notebook tests need nbformat, nbclient, jupytext, ipykernel and matplotlib: pip install -e ".[notebooks]"'
nbformat = pytest.importorskip("nbformat", reason=REASON)
pytest.importorskip("jupytext", reason=REASON)
nbclient = pytest.importorskip("nbclient", reason=REASON)
pytest.importorskip("ipykernel", reason=REASON)
pytest.importorskip("matplotlib", reason=REASON)
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; every notebook runs in well under 2 minutes on 2 CPU cores


def kernel_for_this_interpreter(spec_dir: Path) -> KernelManager:
    """A ``python3`` kernel running ``sys.executable``, whatever kernel specs the user or machine has."""
    kernel = spec_dir / "kernels" / "python3"
    kernel.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)", "language": "python"}
    (kernel / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernel.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_fresh(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # headless: figures render without a display
    monkeypatch.setenv("PYTHONPATH", str(ROOT), prepend=os.pathsep)  # this checkout's ignite_tbptt
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=kernel_for_this_interpreter(tmp_path), kernel_name="python3", timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails


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
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOK_DIR / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    expected = [(c.cell_type, c.source) for c in build.cells_of(source)]
    saved = [(c.cell_type, c.source) for c in nbformat.read(path, as_version=4).cells]
    assert saved == expected, f"{path.name} is out of date with {source.relative_to(ROOT)}: python notebooks/build.py"
