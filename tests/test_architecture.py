"""docs/ARCHITECTURE.md stays true: every documented entry point exists with exactly the documented parameters."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"
LINE = re.compile(r"^- `(sensitivity(?:\.\w+)+)\(([^`]*)\)`$")


def documented():
    text = DOC.read_text()
    section = text.split("## Public entry points", 1)[1]
    return [(m.group(1), [p.strip() for p in m.group(2).split(",") if p.strip()])
            for m in map(LINE.match, section.splitlines()) if m]


def resolve(path):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(path)


def params(obj):
    out = []
    for p in inspect.signature(obj).parameters.values():
        if p.name in ("self", "cls"):
            continue
        out.append(("*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else "") + p.name)
    return out


def test_the_section_lists_entry_points():
    assert len(documented()) >= 25


@pytest.mark.parametrize("name,expected", documented(), ids=[n for n, _ in documented()])
def test_documented_signature_matches_code(name, expected):
    assert params(resolve(name)) == expected, f"docs/ARCHITECTURE.md: {name} differs from the code"
