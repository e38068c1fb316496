"""The API pages are complete: every public name is listed, every callable taking arguments documents them, and
every field of a named tuple and every member of ``Tbptt_Events`` has its own description.

The checks read the docstrings and the ``#:`` comments that Sphinx's autodoc renders, so they run without Sphinx.
"""

import enum
import inspect
import re
from pathlib import Path

import pytest

import ignite_tbptt

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = sorted(ignite_tbptt.__all__)
SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Attributes):\s*$", re.M)


def documented_arguments(obj) -> str:
    """The text of the docstring's argument sections (Google style, as napoleon reads them)."""
    doc = inspect.getdoc(obj) or ""
    text = []
    for found in SECTION.finditer(doc):
        section = doc[found.end():].split("\n\n")[0]  # up to the next blank line
        text.append(section)
    return "\n".join(text)


def arguments_of(obj):
    names = [p for p in inspect.signature(obj).parameters if p not in ("self", "args", "kwargs")]
    return [p for p in names if not p.startswith("_")]


def is_named_tuple(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def commented(obj, names) -> list:
    """The ``names`` of ``obj``'s class body that lack a ``#:`` comment on the line above them."""
    lines = inspect.getsource(obj).splitlines()
    missing = []
    for name in names:
        at = [i for i, line in enumerate(lines) if re.match(rf"\s+{name}\s*[:=]", line)]
        if not at or not lines[at[0] - 1].strip().startswith("#:"):
            missing.append(name)
    return missing


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_in_the_api_index(name):
    entries = re.findall(r"^   (\w+)$", (ROOT / "docs" / "api.md").read_text(), re.M)
    assert name in entries, f"{name} is missing from docs/api.md's autosummary lists"


CALLABLES = [n for n in PUBLIC if callable(getattr(ignite_tbptt, n)) and not isinstance(getattr(ignite_tbptt, n), enum.EnumMeta)
             and not is_named_tuple(getattr(ignite_tbptt, n))]


@pytest.mark.parametrize("name", CALLABLES)
def test_every_callable_documents_its_arguments(name):
    obj = getattr(ignite_tbptt, name)
    arguments = arguments_of(obj)
    if not arguments:
        return
    text = documented_arguments(obj)
    assert text, f"{name} takes {arguments} but its docstring has no Args section"
    missing = [a for a in arguments if not re.search(rf"\b{a}\b", text)]
    assert not missing, f"{name}'s Args section does not describe {missing}"


@pytest.mark.parametrize("name", [n for n in PUBLIC if is_named_tuple(getattr(ignite_tbptt, n))])
def test_every_field_is_described(name):
    obj = getattr(ignite_tbptt, name)
    assert not commented(obj, obj._fields), f"{name}'s fields {commented(obj, obj._fields)} have no #: description"


def test_every_event_is_described():
    members = list(ignite_tbptt.Tbptt_Events.__members__)
    assert len(members) == 6
    assert not commented(ignite_tbptt.Tbptt_Events, members), "Tbptt_Events members without a #: description"


def test_the_checks_catch_what_they_check():
    """Each check fails on an undocumented example: the test cannot pass vacuously."""

    def undocumented(a, b=1):
        """Does something."""

    def partly(a, b=1):
        """Does something.

        Args:
            a: the first.
        """

    class Pair:
        x: int
        #: described
        y: int

    assert documented_arguments(undocumented) == "" and arguments_of(undocumented) == ["a", "b"]
    assert "b" not in re.findall(r"\b\w+\b", documented_arguments(partly).split(":")[0])
    assert commented(Pair, ["x", "y"]) == ["x"]
