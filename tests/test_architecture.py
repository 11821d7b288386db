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


# ------------------------------------------------------------------------- import layering (issue 23)
import ast  # noqa: E402
import json  # noqa: E402

REPO = DOC.parents[1]
PACKAGE = REPO / "sensitivity"
ROW = re.compile(r"^(?P<name>[\w/.]+)\s+(?:\(no deps\)|->\s+(?P<deps>\*|[\w/.]+(?:,\s*[\w/.]+)*))(?:\s{2,}.*)?$")


def layering_rows():
    """``[(unit, is_package, deps or None for '*')]`` in the order of the table in docs/ARCHITECTURE.md."""
    text = DOC.read_text()
    start = text.index("no module imports a later stage")
    block = text[text.index("```\n", start) + 4:]
    block = block[:block.index("```")]
    rows = []
    for line in block.splitlines():
        if not line.strip() or line[0].isspace():
            continue  # a row's continuation
        m = ROW.match(line)
        assert m, f"docs/ARCHITECTURE.md: cannot read the layering row {line!r}"
        deps = m.group("deps")
        rows.append((m.group("name").rstrip("/"), m.group("name").endswith("/"),
                     None if deps == "*" else [d.strip().rstrip("/") for d in (deps or "").split(",") if d.strip()]))
    return rows


def module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules():
    return {module_name(f): f for f in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(source, name, is_package, known):
    """Every ``sensitivity`` module ``source`` imports (top-level and function-local), resolved to module names."""
    pkg = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != "sensitivity" and not target.startswith("sensitivity."):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name == "sensitivity" or a.name.startswith("sensitivity."))
    return out


def unit_of(module, rows):
    best = None
    for unit, is_package, _ in rows:
        dotted = "sensitivity" if unit == "__init__" else "sensitivity." + unit.replace("/", ".")
        hit = module == dotted or (is_package and module.startswith(dotted + "."))
        if unit == "__init__":
            hit = module == "sensitivity"
        if hit and (best is None or len(dotted) > len(best[1])):
            best = (unit, dotted)
    return best and best[0]


def _import_graph():
    rows = layering_rows()
    mods = package_modules()
    graph = {}
    for name, path in mods.items():
        graph[name] = imported_modules(path.read_text(), name, path.name == "__init__.py", mods)
    return rows, mods, graph


def test_the_layering_table_is_a_one_way_order():
    rows = layering_rows()
    names = [u for u, _, _ in rows]
    assert len(rows) >= 30 and len(set(names)) == len(names), "docs/ARCHITECTURE.md: a layering row is repeated"
    seen = set()
    for unit, _, deps in rows:
        for dep in deps or []:
            assert dep in seen, f"docs/ARCHITECTURE.md: {unit} -> {dep}, but {dep} is not a row above it"
        seen.add(unit)
    unmapped = [m for m in package_modules() if unit_of(m, rows) is None]
    assert not unmapped, f"docs/ARCHITECTURE.md: no layering row holds {unmapped}"


def test_every_import_follows_the_layering():
    rows, mods, graph = _import_graph()
    deps = {u: d for u, _, d in rows}

    def allowed(unit, memo={}):  # noqa: B006 - a per-call cache
        if unit not in memo:
            out = {unit}
            for d in deps[unit] or []:
                out |= allowed(d)
            memo[unit] = out
        return memo[unit]

    bad = []
    for name, targets in graph.items():
        unit = unit_of(name, rows)
        if deps[unit] is None:  # commands/: may import anything
            continue
        for t in sorted(targets):
            if t == "sensitivity" and unit != "__init__":
                continue  # the package root (__version__)
            tu = unit_of(t, rows)
            if tu not in allowed(unit, {}):
                bad.append(f"{name} imports {t} ({unit} -> {tu})")
    assert not bad, "imports the layering in docs/ARCHITECTURE.md does not allow:\n" + "\n".join(bad)


def test_no_layering_row_claims_an_import_that_does_not_exist():
    rows, mods, graph = _import_graph()
    used = {}
    for name, targets in graph.items():
        used.setdefault(unit_of(name, rows), set()).update(unit_of(t, rows) for t in targets)
    bad = [f"{u} -> {d}" for u, _, ds in rows for d in ds or [] if d not in used.get(u, set())]
    assert not bad, "docs/ARCHITECTURE.md lists imports no module makes: " + ", ".join(bad)


def test_the_package_docstring_refers_to_the_layering_table():
    import sensitivity

    doc = sensitivity.__doc__
    assert "docs/ARCHITECTURE.md" in doc and "->" not in doc, "sensitivity/__init__.py must not restate the layering"


def _sources_outside_the_cli():
    """(label, source) of every module of the package outside the CLI, every benchmark and script, and
    the code cells of every notebook."""
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(REPO).as_posix()
        if rel.startswith("sensitivity/commands/") or rel == "sensitivity/cli.py":
            continue
        yield rel, f.read_text(), module_name(f), f.name == "__init__.py"
    for folder in ("benchmarks", "scripts"):
        for f in sorted((REPO / folder).rglob("*.py")):
            yield f.relative_to(REPO).as_posix(), f.read_text(), "scripts." + f.stem, False
    for f in sorted((REPO / "notebooks").rglob("*.ipynb")):
        cells = json.loads(f.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("!", "%")))
        yield f.relative_to(REPO).as_posix(), code, "notebook", False


def test_nothing_outside_the_cli_imports_commands():
    """The CLI is thin: a notebook, a benchmark, a script or the package calls library API, never
    ``sensitivity.commands``."""
    mods = package_modules()
    bad = []
    for label, source, name, is_package in _sources_outside_the_cli():
        hits = [t for t in imported_modules(source, name, is_package, mods)
                if t == "sensitivity.commands" or t.startswith("sensitivity.commands.")]
        bad += [f"{label} imports {t}" for t in hits]
    assert not bad, "\n".join(bad)


def test_the_import_scan_sees_local_and_relative_imports():
    src = "def f():\n    from ..commands.sample import run\n    from . import protocol\n"
    mods = {"sensitivity.evaluation.protocol": None, "sensitivity.commands.sample": None}
    got = imported_modules(src, "sensitivity.evaluation.x", False, mods)
    assert got == {"sensitivity.commands.sample", "sensitivity.evaluation.protocol"}
