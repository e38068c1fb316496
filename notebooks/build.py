"""Build the notebooks in this folder from their sources in ``src/`` and execute them, keeping the outputs.

Each ``src/NAME.py`` is a script in jupytext's "percent" format: ``# %%`` starts a code cell and
``# %% [markdown]`` a markdown cell whose lines are comments. jupytext reads it, and nbclient runs the
notebook in a fresh kernel of this interpreter (a kernel spec made for the run, so nothing is installed and
no registered kernel is needed), with the repository root on ``PYTHONPATH`` and matplotlib's inline backend,
so the saved notebook carries its plots. ``jupytext --execute`` runs the kernel its metadata names instead.

    python notebooks/build.py                 # every src/*.py
    python notebooks/build.py 01 03           # the ones whose name starts with 01 or 03
    python notebooks/build.py --no-execute    # cells only, no outputs
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CELL_TIMEOUT_S = 300
STARTUP_TIMEOUT_S = 240  # a kernel starts in seconds; on a loaded machine (load 8 on 2 cores) it took over 60


def cells_of(source: Path) -> list:
    """The cells of a percent-format script, read by jupytext, with stable ids: a rebuild changes only what changed."""
    cells = jupytext.read(source, fmt="py:percent").cells
    for number, cell in enumerate(cells):
        cell.id = f"cell-{number:02d}"
    return cells


def kernel_manager(spec_dir: Path) -> KernelManager:
    """A ``python3`` kernel that runs this very interpreter, whatever kernel specs the machine has."""
    kernel = spec_dir / "kernels" / "python3"
    kernel.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)", "language": "python"}
    (kernel / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernel.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = CELL_TIMEOUT_S) -> None:
    """Run ``nb`` in place in a fresh kernel (cwd ``cwd``, repository root importable)."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    old = {key: os.environ.get(key) for key in (*env, "MPLBACKEND")}
    os.environ.update(env)
    os.environ.pop("MPLBACKEND", None)  # let ipykernel pick the inline backend: PNGs in the outputs
    try:
        with tempfile.TemporaryDirectory() as spec_dir:
            client = NotebookClient(nb, km=kernel_manager(Path(spec_dir)), timeout=timeout, kernel_name="python3",
                                    startup_timeout=STARTUP_TIMEOUT_S,
                                    record_timing=False, resources={"metadata": {"path": str(cwd)}})
            client.execute()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build(source: Path, run: bool = True) -> float:
    """Write ``source``'s notebook next to this script; return the seconds its execution took."""
    nb = nbformat.v4.new_notebook(cells=cells_of(source))
    nb.metadata.update({
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    })
    seconds = 0.0
    if run:
        start = time.perf_counter()
        execute(nb, HERE)
        seconds = time.perf_counter() - start
    nbformat.validate(nb)
    nbformat.write(nb, HERE / f"{source.stem}.ipynb")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="build only the sources whose name starts with one of these")
    parser.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    args = parser.parse_args(argv)
    sources = sorted(p for p in (HERE / "src").glob("*.py")
                     if not args.prefixes or p.name.startswith(tuple(args.prefixes)))
    if not sources:
        parser.error("no matching notebook sources in notebooks/src/")
    for source in sources:
        seconds = build(source, run=not args.no_execute)
        print(f"{source.stem}.ipynb" + (f": executed in {seconds:.1f} s" if seconds else ": written"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
