"""Every benchmark script imports (a name one of them takes from another, removed there, breaks
the script only when someone runs it, possibly months later), and every block a script rewrites
exists in README or a docs page."""

import importlib
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_script_imports(name, bench_path):
    sys.modules.pop(name, None)
    module = importlib.import_module(name)
    assert module.__doc__, f"benchmarks/{name}.py says what it measures in its docstring"


def test_every_block_a_script_writes_is_in_a_page():
    root = BENCH.parent
    pages = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    have = set(re.findall(r"<!-- ([\w-]+):begin -->", pages))
    assert have == set(re.findall(r"<!-- ([\w-]+):end -->", pages))
    written = set()
    for path in BENCH.glob("*.py"):
        written |= set(re.findall(r'replace_block\(\s*"([\w-]+)"', path.read_text()))
    assert written and written <= have, sorted(written - have)
    readme = (root / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme):
        assert (root / link).exists(), link
    assert all(f"docs/{p.name}" in readme for p in (root / "docs").glob("*.md")), "every docs page linked from README"


def test_every_relative_link_in_the_pages_resolves():
    root = BENCH.parent
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:\s]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"
