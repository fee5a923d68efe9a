"""Shared by the benchmark scripts: where results go and how README blocks are regenerated."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def save_json(name: str, data: dict) -> None:
    """Write ``results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def replace_block(name: str, text: str, readme: Path = ROOT / "README.md") -> None:
    """Replace what stands between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in README."""
    src = readme.read_text()
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(src):
        raise SystemExit(f"README.md has no <!-- {name}:begin/end --> block")
    readme.write_text(pattern.sub(lambda m: m.group(1) + text.rstrip() + "\n" + m.group(2), src))
