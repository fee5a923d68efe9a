"""README's headline table: SODA beside the best peer at 2x and 3x measured speedup, read from the
peers tables (``results/peers-*.json``, written by ``peers.py``; full tables in docs/benchmarks.md).

At each speed, every method's PSNR and Fréchet distance against the full model's images are
interpolated along its own measured curve (``ditaccel.bench.curve_at``), or taken from its point
within 5% of that speed; a method that reaches neither is left out.  SODA is the better of its two budgets there; the best peer is
the one with the highest PSNR there, FORA, ToCa and Δ-DiT as our runtime runs them included (SODA's
ablations, such as soda-reuse, are not peers).

    python benchmarks/headline.py
"""

from __future__ import annotations

import json

from common import RESULTS, replace_block
from ditaccel.bench import ABLATIONS, SODA, curve_at

TABLES = {  # results file -> what it measured
    "peers-ddim": "fmnist-dit, DDIM-50",
    "peers-ddpm": "fmnist-dit, DDPM-250",
    "peers-ddim-fmnist-pixart": "fmnist-pixart (text), DDIM-50",
    "peers-euler-fmnist-mmdit": "fmnist-mmdit (SD3-style text), Euler-28",
}
SPEEDS = (2.0, 3.0)


TOL = 0.05  # a method whose curve stops short of a speed still counts there with a point this close


def at_speed(rows: list[dict], method: str, x: float) -> dict | None:
    """``method``'s PSNR and FD at measured speedup ``x``: on its curve, or its point within
    ``TOL`` of ``x``."""
    at = curve_at(rows, method, x)
    if at is not None:
        return at
    near = [r for r in rows if r["method"] == method and abs(r["speedup_measured"] / x - 1) <= TOL]
    r = min(near, key=lambda r: abs(r["speedup_measured"] - x), default=None)
    return None if r is None else {"psnr": r["psnr"], "fd_vs_full": r["fd_vs_full"]}


def best(rows: list[dict], methods, x: float):
    """(method, its values at ``x``) of the highest PSNR at ``x`` among ``methods``, or None."""
    found = [(m, at) for m in methods for at in [at_speed(rows, m, x)] if at is not None]
    return max(found, key=lambda p: p[1]["psnr"], default=None)


def cell(found, rows: list[dict], methods) -> str:
    if found is None:
        fastest = max((r["speedup_measured"] for r in rows if r["method"] in methods), default=None)
        return "not reached" + ("" if fastest is None else f" (fastest: {fastest:.2f}x)")
    m, at = found
    return f"{m}: {at['psnr']:.1f} dB, FD {at['fd_vs_full']:.2f}"


def table() -> str:
    lines = ["| model, sampler | speed | SODA | best other method |", "|---|---|---|---|"]
    machines = []
    for name, what in TABLES.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        out = json.loads(path.read_text())
        machines.append(f"{what}: {out['cpu']}, {out['threads']} threads, {out['dtype']}")
        rows = [r for r in out["rows"] if r.get("speedup_measured") is not None and r["method"] != "full"]
        others = sorted({r["method"] for r in rows} - set(SODA) - set(ABLATIONS))  # SODA's ablations are SODA
        for x in SPEEDS:
            lines.append(f"| {what} | {x:g}x | {cell(best(rows, SODA, x), rows, SODA)} | "
                         f"{cell(best(rows, others, x), rows, others)} |")
    lines += ["", "PSNR and Fréchet distance (FD) of each method's images against the full model's (higher PSNR, "
              "lower FD: closer), interpolated along its measured speed curve (or its point within 5%); speed: measured wall-clock "
              "speedup over the full model (median of interleaved pairs), measured on " + "; ".join(machines)
              + ". Full tables, other speeds and every peer: [docs/benchmarks.md](docs/benchmarks.md)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    text = table()
    print(text)
    replace_block("headline", text)


if __name__ == "__main__":
    main()
