"""The docs stay walkable and honest: every relative link resolves (files and #anchors as GitHub renders
them), every results page names the command that regenerates it and equals what its run's JSON renders,
and the README stays an introduction. No torch: fast."""

import functools
import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted({ROOT / "README.md", *ROOT.glob("*/README.md"), *(ROOT / "docs").rglob("*.md")})
RESULTS = ROOT / "docs" / "results"
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)


def _without_code(text: str) -> str:
    """The text with fenced blocks and inline code spans blanked (links inside them are not links)."""
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^\s*(```+|~~~+)", line)
        if fence is None and m:
            fence = m.group(1)[:3]
            out.append("")
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append("")
            continue
        out.append(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line))
    return "\n".join(out)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text stays, its target goes
    text = text.replace("`", "").strip().lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in " -_" or cat[0] in "LN" or cat == "Mn":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset:
    seen: dict = {}
    out = set()
    for line in _without_code(path.read_text()).splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = github_anchor(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(path: Path):
    text = _without_code(path.read_text())
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in list(LINK.finditer(line)) + list(HTML_SRC.finditer(line)):
            yield lineno, m.group(1)


def _cases():
    for doc in DOCS:
        for lineno, target in links(doc):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            yield pytest.param(doc, lineno, target, id=f"{doc.relative_to(ROOT)}:{lineno}:{target}")


def test_there_are_docs_and_links():
    assert (ROOT / "docs" / "guide").is_dir() and (ROOT / "docs" / "method.md").is_file()
    assert sum(1 for _ in _cases()) > 50


@pytest.mark.parametrize("doc,lineno,target", list(_cases()))
def test_relative_link_resolves(doc, lineno, target):
    file_part, _, anchor = target.partition("#")
    dest = (doc.parent / file_part).resolve() if file_part else doc
    where = f"{doc.relative_to(ROOT)}:{lineno}: {target}"
    assert dest.exists(), f"{where}: no such file"
    assert ROOT in dest.parents or dest == ROOT, f"{where}: points outside the repository"
    if anchor:
        assert dest.suffix == ".md", f"{where}: an anchor into a file that is not markdown"
        assert anchor in anchors(dest), f"{where}: no heading with that anchor in {dest.relative_to(ROOT)}"


def test_anchor_rule_matches_github():
    assert github_anchor("1.1 Which layers are quantized") == "11-which-layers-are-quantized"
    assert github_anchor("`bench_methods.py` — error vs bits (K=128)") == "bench_methodspy--error-vs-bits-k128"
    assert github_anchor("Search vs the allocators, measured on held-out images") == \
        "search-vs-the-allocators-measured-on-held-out-images"


def test_no_doc_or_docstring_cites_the_private_reference():
    bad = []
    for path in [*DOCS, *(ROOT / "sensitivity").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        text = path.read_text()
        if "../shared" in text or "shared/reference" in text:
            bad.append(str(path.relative_to(ROOT)))
    assert not bad, f"cite docs/ instead of ../shared (users do not have it): {bad}"


def _results_tables():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "scripts" / "results_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_results_page_names_its_command_and_run():
    pages = [p for p in RESULTS.glob("*.md") if p.name != "README.md"]
    assert pages, "docs/results/ has no generated page"
    for page in pages:
        text = page.read_text()
        assert re.search(r"^Regenerate: `[^`]*scripts/results_tables\.py [^`]+`$", text, re.M), \
            f"{page.relative_to(ROOT)}: no 'Regenerate: `...`' line with its command"
        assert "generated by scripts/results_tables.py" in text, f"{page.relative_to(ROOT)}: not generated"
        assert re.search(r"commit `[0-9a-f]{7,}", text) and "calibrator" in text, \
            f"{page.relative_to(ROOT)}: no run provenance (commit, calibrator)"


def test_results_pages_equal_what_their_data_renders():
    rt = _results_tables()
    expected = rt.expected_pages()
    on_disk = {p for p in RESULTS.glob("*.md") if p.name != "README.md"}
    assert on_disk == set(expected), "a results page without data, or data without its page"
    for path, text in expected.items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} differs from its data: rerun its command"
    readme = (ROOT / "README.md").read_text()
    assert rt.expected_readme(readme) in (None, readme), "README's results blocks differ from their data"


def test_results_index_lists_every_page():
    index = (RESULTS / "README.md").read_text()
    for page in RESULTS.glob("*.md"):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/results/README.md does not list {page.name}"


def test_readme_is_an_introduction():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250: the guide is docs/guide/)"


def test_run_provenance_records_commit_date_calibrator():
    from sensitivity.provenance import run_provenance

    start = run_provenance()
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no commit to record")
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", start["commit"] or "") and start["calibrator_s"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", start["date"]) and start["machine"]["cpus"] >= 1
    end = run_provenance(start)
    assert end["date"] == start["date"] and len(end["calibrator_s"]) == 2 and len(end["load_average"]) == 2


def test_demo_headline_ranks_by_the_paired_verdicts_not_the_point_values():
    """A searched config that is numerically second but tied counts as tied-best; beating every other
    allocator needs each of them 'worse' than the search beyond the noise."""
    rt = _results_tables()
    rows = [{"target": 3.4, "method": "search", "fid": 1.5, "verdict": "tie"},
            {"target": 3.4, "method": "reference top-1 (λ 1)", "fid": 1.4, "verdict": "best", "vs_search": "tie"},
            {"target": 3.6, "method": "search", "fid": 1.2, "verdict": "best"},
            {"target": 3.6, "method": "error ILP", "fid": 2.0, "verdict": "worse", "vs_search": "worse"},
            {"target": 3.8, "method": "search", "fid": 1.3, "verdict": "worse"},
            {"target": 3.8, "method": "error ILP", "fid": 1.0, "verdict": "best", "vs_search": "better"}]
    s = {"rows": rows, "metric": "fid", "num_configs": 10, "images_per_config": 20, "model": "digits-dit",
         "predictor": "additive", "check_images": 30, "check_fp16": {"fid": 1.0}}
    line = rt.demo_headline(s)
    assert "at 2 of 3 targets" in line and "beyond the noise at 1 of them" in line
