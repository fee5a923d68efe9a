"""Shiva's wall-clock at realistic size: a DiT-XL/2-shaped diffusers transformer (28
layers, 1152 wide, 256 tokens, random weights; ``build`` from ``xl_latency.py``) with an
untrained router, every block after the first routing the same number of tokens (keep 0.6 ->
152 of 256, counts rounded to multiples of 8), driven by a plain DDIM loop (one image, CFG as one
batch of 2 rows).

Interleaved, median of ``--repeats`` (order alternating), in one process:

- ``full``: the unrouted model;
- ``shiva``: the routing plan with the router (what a user runs);
- ``shiva, free router``: the same plan with precomputed scores (router cost ~0), so
  router overhead = shiva - free router;
- gather/scatter: the routing ops of one block (top-k of the scores, sort, gather of the kept
  tokens, scatter of the block output into the skip path) timed on their own at the same shapes,
  times the number of routed blocks per trajectory;
- with ``--compile``: both again with the blocks through ``torch.compile`` (inductor, regional:
  one graph per distinct block input shape); compile time and the number of graphs compiled over
  the first generation (and over a second one: 0 expected) are reported.

Rewrites its page's ``shiva-xl-latency`` block.

    python benchmarks/shiva_xl_latency.py [--steps 10 --repeats 3 --keep 0.6 --dtype auto --compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from ditaccel.metrics import flop_counter

from common import machine, replace_block, save_json
from xl_latency import build
from ditaccel.methods.shiva.policy import plan_from_ratios
from ditaccel.methods.shiva.router import ShivaRouter
from ditaccel.registry import resolve_dtype
from ditaccel.runtime import apply, remove
from ditaccel.tokens import gather_tokens, scatter_tokens
from diffusers import DDIMScheduler

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class TimedRouter:
    """The router, with the time its calls take added up."""

    def __init__(self, router):
        self.router, self.seconds, self.calls = router, 0.0, 0

    def __call__(self, x, call):
        t0 = time.perf_counter()
        s = self.router(x, call)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return s



def trajectory(tf, steps: int, dtype=torch.bfloat16) -> torch.Tensor:
    """One DDIM trajectory of ``tf`` on one image with classifier-free guidance (scale 4) as one
    batch of two rows: the latent it ends at."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)
    labels = torch.tensor([207, 1000])
    with torch.no_grad():
        for t in sched.timesteps:
            inp = torch.cat([x, x]).to(dtype)
            out = tf(inp, timestep=t.repeat(2), class_labels=labels).sample.float()
            cond, uncond = out[:, :4].chunk(2)
            x = sched.step(uncond + 4.0 * (cond - uncond), t, x).prev_sample
    return x

def routing_ops_seconds(n: int, k: int, width: int, dtype, repeats: int = 50) -> float:
    """Median time of one routed block's own ops: top-k + sort of (2, n) scores, gather of (2, k,
    width) tokens, scatter of the block output into (2, n, width)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, n, width, generator=g).to(dtype)
    scores = torch.randn(2, n, generator=g).to(dtype)
    out = torch.randn(2, k, width, generator=g).to(dtype)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        idx = scores.topk(k, dim=1).indices.sort(dim=1).values
        scatter_tokens(x, idx, gather_tokens(x, idx) + out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=float, default=0.6)
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    ap.add_argument("--compile", action="store_true", help="also measure with torch.compile (inductor)")
    ap.add_argument("--render", default=None, help="only rewrite its page's block from this result JSON")
    args = ap.parse_args()
    if args.render:
        import json

        render(json.loads(open(args.render).read()))
        return
    dtype_name = resolve_dtype(args.dtype)
    dtype = DTYPES[dtype_name]
    tf = build().to(dtype)
    layers, n, width = len(tf.transformer_blocks), 256, 1152
    ratios = torch.full((args.steps, layers), args.keep, dtype=torch.float64)
    plan = plan_from_ratios(ratios, n, ("attn", "mlp"), multiple=8)
    k = int(plan.route[0, 1])
    router = ShivaRouter.for_model(tf).to(dtype).eval()
    timed = TimedRouter(router)
    fixed = torch.randn(2, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    free = lambda x, call: fixed  # noqa: E731

    def flops() -> int:
        with flop_counter() as c:
            trajectory(tf, 1, dtype)
        return int(c.get_total_flops())

    trajectory(tf, 1, dtype)  # warm-up
    f_full = flops()
    apply(tf, plan, router=router)
    f_shiva = flops()
    remove(tf)

    variants = {"full": None, "shiva": timed, "shiva, free router": free}

    def run(name: str) -> float:
        if variants[name] is None:
            remove(tf)
        else:
            apply(tf, plan, router=variants[name])
        t0 = time.perf_counter()
        trajectory(tf, args.steps, dtype)
        return time.perf_counter() - t0

    walls = {name: [] for name in variants}
    router_s = []
    for r in range(args.repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            timed.seconds = 0.0
            walls[name].append(run(name))
            if name == "shiva":
                router_s.append(timed.seconds)
        print({name: round(w[-1], 2) for name, w in walls.items()}, flush=True)
    remove(tf)
    med = {name: statistics.median(w) for name, w in walls.items()}
    routed_blocks = args.steps * (layers - 1)
    ops = routing_ops_seconds(n, k, width, dtype) * routed_blocks
    out = {"machine": machine(), "dtype": dtype_name, "threads": torch.get_num_threads(), "steps": args.steps,
           "repeats": args.repeats, "keep": args.keep, "tokens_kept": k, "num_tokens": n,
           "mean_keep_routed": k / n, "flops_speedup": f_full / f_shiva, "walls": walls, "median_s": med,
           "speedup": med["full"] / med["shiva"], "speedup_free_router": med["full"] / med["shiva, free router"],
           "router_s_in_run": statistics.median(router_s),
           "routing_ops_s": ops}
    if args.compile:
        out["compiled"] = compiled(tf, plan, router, args, dtype)
    out["args"] = vars(args)
    save_json(f"shiva_xl_latency-{dtype_name}", out)
    render(out)


def render(out: dict) -> None:
    """its page's block from a result (``--render results/shiva_xl_latency-<dtype>.json`` redoes it)."""
    med = out["median_s"]
    ops, k, n = out["routing_ops_s"], out["tokens_kept"], out["num_tokens"]
    router = out["router_s_in_run"]
    pct = lambda s: 100 * s / med["shiva"]  # noqa: E731
    ideal = med["shiva"] - router - ops
    lines = ["| | seconds per trajectory | speedup vs full |", "|---|---|---|",
             f"| full model | {med['full']:.2f} | 1.00x |",
             f"| Shiva keep {out['keep']:g} (router + routing) | {med['shiva']:.2f} | **{out['speedup']:.2f}x** |",
             f"| Shiva less its router and routing ops (ideal) | {ideal:.2f} | {med['full'] / ideal:.2f}x |",
             f"| check: same plan, precomputed scores | {med['shiva, free router']:.2f} | "
             f"{out['speedup_free_router']:.2f}x |"]
    if "compiled" in out:
        c = out["compiled"]
        lines += [f"| full model, compiled | {c['median_s']['full']:.2f} | {med['full'] / c['median_s']['full']:.2f}x |",
                  f"| Shiva, compiled | {c['median_s']['shiva']:.2f} | {med['full'] / c['median_s']['shiva']:.2f}x "
                  f"({c['speedup']:.2f}x vs compiled full) |"]
    goal = out["speedup"] >= 1.5
    lines += ["", f"Goal: at least 1.5x at keep 0.6: **{'met' if goal else 'missed'}** ({out['speedup']:.2f}x "
              f"measured, {out['flops_speedup']:.2f}x in FLOPs, {out['dtype']} on the CPU named below).", ""]
    lines += [f"Overheads inside the Shiva row: router {router:.2f} s ({pct(router):.1f}%: its calls timed in the "
              f"run), gather/scatter/top-k {ops:.2f} s ({pct(ops):.1f}%: those ops timed alone at the same shapes x "
              f"{out['steps'] * 27} routed block calls). FLOPs: {out['flops_speedup']:.2f}x fewer. {k} of {n} tokens "
              "in 27 of 28 blocks. The check row runs the same plan with a fixed score tensor instead of the router: "
              f"{100 * (med['shiva, free router'] / med['shiva'] - 1):+.1f}% against the Shiva row, while the full "
              f"model's own runs spread by {100 * (max(out['walls']['full']) / min(out['walls']['full']) - 1):.0f}% "
              "(max / min) on this shared machine."]
    if "compiled" in out:
        c = out["compiled"]
        lines += [f"Compiled (inductor, blocks only, `dynamic=False`): the full model's warm-up compiled "
                  f"{c['graphs_full_model']} graphs, Shiva's first generation {c['graphs_first']} more, its second "
                  f"{c['graphs_second']} ({c['compile_s']:.0f} s of compiling and first runs in all). Shiva's plan "
                  f"has two token counts ({n} in the first block, {k} in the others): the block forward at {n} "
                  "tokens was already compiled for the full model, and one graph per count serves all 28 blocks."]
    lines += [f"DiT-XL/2-shaped transformer (random weights, untrained router), {out['dtype']}, DDIM-{out['steps']}, one "
              f"image with CFG (2 rows per call), {out['threads']} threads on {out['machine']}; median of "
              f"{out['repeats']} interleaved runs. Generated by `python benchmarks/shiva_xl_latency.py"
              f"{' --compile' if 'compiled' in out else ''}`."]
    table = "\n".join(lines)
    replace_block("shiva-xl-latency", table)
    print(table)


def compiled(tf, plan, router, args, dtype) -> dict:
    """The full model and Shiva with the blocks through torch.compile (regional), interleaved."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = lambda: int(counters["stats"]["unique_graphs"])  # noqa: E731
    blocks = list(tf.transformer_blocks)

    def full_on():
        remove(tf)
        for b in blocks:
            b.compile(dynamic=False)

    def full_off():
        for b in blocks:
            b._compiled_call_impl = None

    t0 = time.perf_counter()
    full_on()
    trajectory(tf, 2, dtype)
    full_off()
    apply(tf, plan, router=router, compile=True)
    before = graphs()
    trajectory(tf, args.steps, dtype)
    first = graphs() - before
    compile_s = time.perf_counter() - t0
    trajectory(tf, args.steps, dtype)
    second = graphs() - before - first
    walls = {"full": [], "shiva": []}
    for r in range(args.repeats):
        for name in (("full", "shiva") if r % 2 == 0 else ("shiva", "full")):
            if name == "full":
                full_on()
            else:
                apply(tf, plan, router=router, compile=True)
            t1 = time.perf_counter()
            trajectory(tf, args.steps, dtype)
            walls[name].append(time.perf_counter() - t1)
            if name == "full":
                full_off()
        print("compiled", {n: round(w[-1], 2) for n, w in walls.items()}, flush=True)
    remove(tf)
    med = {n: statistics.median(w) for n, w in walls.items()}
    return {"walls": walls, "median_s": med, "speedup": med["full"] / med["shiva"], "compile_s": compile_s,
            "graphs_full_model": before, "graphs_first": first, "graphs_second": second}


if __name__ == "__main__":
    main()
