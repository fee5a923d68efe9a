"""What an accelerated run computed, per sampling step, as rows and as a printable table."""

from __future__ import annotations

from collections import defaultdict

from .state import RunState


def per_step(state: RunState) -> list[dict]:
    """One row per step of the last trajectory: anchor, fraction of tokens computed per module
    (mean over layers and guidance branches), FLOPs (when counted) and wall time."""
    n = state.plan.num_tokens
    rows: dict[int, dict] = {}
    fracs: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in state.records:
        row = rows.setdefault(rec.step, {"step": rec.step, "anchor": rec.anchor, "calls": 0,
                                         "flops": 0 if rec.flops is not None else None, "wall_s": 0.0})
        row["calls"] += 1
        row["wall_s"] += rec.wall_s
        if rec.flops is not None and row["flops"] is not None:
            row["flops"] += rec.flops
        # a (layer, module) without a record ran in full (no hook was needed to execute it)
        for layer in range(state.plan.num_layers):
            for role in state.plan.modules:
                fracs[rec.step][role].append(rec.computed.get((layer, role), n) / n)
    for step, row in rows.items():
        for role in state.plan.modules:
            vals = fracs[step].get(role, [])
            row[role] = sum(vals) / len(vals) if vals else 1.0
    return [rows[s] for s in sorted(rows)]


def format_table(rows: list[dict], modules: tuple[str, ...]) -> str:
    head = ["step", "anchor", *[f"{m} computed" for m in modules], "GFLOP", "ms"]
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for r in rows:
        cells = [str(r["step"]), "yes" if r["anchor"] else "",
                 *[f"{100 * r[m]:.0f}%" for m in modules],
                 "-" if r["flops"] is None else f"{r['flops'] / 1e9:.3f}", f"{1e3 * r['wall_s']:.1f}"]
        lines.append("  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)
