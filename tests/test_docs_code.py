"""Every Python block of the README and the docs runs as pasted, in order within its page.

A page's blocks run one after the other in one fresh namespace, as a reader pasting them into one session
would; a block that fails names its page and line. Runnable blocks are fenced ```` ```python ```` (or
```` ```{testcode} ````, which the Sphinx doctest builder also runs). A block that is not meant to run alone is
an honest fragment: fenced ```` ```{code-block} python ```` with a ``:caption:`` that starts with "Fragment",
which the reader sees above it; any other Python fence is refused, so no block escapes both.
"""

import re
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.parts and "notebooks" not in p.relative_to(ROOT).parts[1:2]]

FENCE = re.compile(r"^(`{3,})(.*)$")
RUNNABLE = {"python", "{testcode}"}


def blocks_of(page: Path) -> List[Tuple[int, str, str, str]]:
    """``(line, fence info, options, code)`` of every fenced block of ``page``, nested fences skipped."""
    found, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        ticks, info, start = opened.group(1), opened.group(2).strip(), i + 1
        i += 1
        while i < len(lines) and lines[i].rstrip() != ticks:
            i += 1
        body = lines[start:i]
        options = [line for line in body if re.match(r"^:\w[\w-]*:", line)]
        code = "\n".join(line for line in body if line not in options)
        found.append((start, info, "\n".join(options), code))
        i += 1
    return found


def is_python(info: str) -> bool:
    return info in RUNNABLE or "python" in info.split() or info in {"py", "pycon", "python3"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_is_runnable_or_a_marked_fragment(page):
    for line, info, options, _ in blocks_of(page):
        if is_python(info) and info not in RUNNABLE:
            assert info == "{code-block} python" and re.search(r"^:caption: Fragment", options, re.M), (
                f"{page.name}:{line}: a Python block fenced {info!r}: fence it ```python to run it, or "
                "```{code-block} python with ':caption: Fragment...' if it cannot run alone"
            )


RUNNABLE_PAGES = [p for p in PAGES if any(info in RUNNABLE for _, info, _, _ in blocks_of(p))]


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_blocks_of_a_page_run_in_order(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # files a block writes land here
    monkeypatch.setenv("MPLBACKEND", "Agg")  # figures render without a display
    import torch

    torch.manual_seed(0)
    namespace = {"__name__": "__main__"}
    for line, info, _, code in blocks_of(page):
        if info not in RUNNABLE:
            continue
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)  # noqa: S102 - our own pages
        except ModuleNotFoundError as e:
            if e.name in {"matplotlib", "tqdm"}:
                pytest.skip(f"{page.name}:{line} needs {e.name}")
            raise
    capsys.readouterr()


def test_the_blocks_are_found():
    """The runnable blocks that the issue counted (19), and more as pages gain them: the parser misses none."""
    runnable = [b for p in PAGES for b in blocks_of(p) if b[1] in RUNNABLE]
    assert len(runnable) >= 18
