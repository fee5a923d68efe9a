"""Experiment (not part of the library): where does a reusing step's time go on the bundled DiT,
and how much would a block-level fast path save?  The runtime as it is (module hooks, with the
blocks' conditioning batched once per trajectory since runtime revision 4) is timed next to the
same with each step's conditioning computed in its step (``batch_conditioning=False``, the
runtime before revision 4).  On a step where the plan reuses both the attention and the MLP of a
block, the block's output is ``h + gate_msa * A + gate_mlp * F`` with this step's gates (from the
block's own ``norm1`` on one token) and the cached module outputs A, F.  This script attaches a
prototype block hook over ditaccel's module hooks, checks that the images are bit-identical to the
runtime's, and times executions of the same FORA plan against the full model, interleaved in a rotating order:
the runtime as it is (module hooks), the block path in eager torch, and the block path with the
gated residual adds fused by ``torch.compile`` (inductor, ``emulate_precision_casts`` so that the
fused kernel rounds like eager and stays bit-identical).

    python notes/experiments/fused_reuse.py [--interval 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from diffusers.hooks import HookRegistry, ModelHook

from ditaccel.methods import make_plan, model_shape
from ditaccel.plan import REUSE
from ditaccel.registry import load_pipeline
from ditaccel.runtime import apply, remove, state_of
from ditaccel.runtime.adapters import find_blocks
from ditaccel.sampling import sample

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from runtime_overhead import CallTimer  # noqa: E402

inductor_config.emulate_precision_casts = True


def combine(h, gate_attn, attn, gate_mlp, mlp):  # the order and roundings of BasicTransformerBlock
    h = gate_attn.unsqueeze(1) * attn + h
    return gate_mlp.unsqueeze(1) * mlp + h


class BlockReuse(ModelHook):
    def __init__(self, pipe, layer: int, mode: dict):
        super().__init__()
        self.pipe, self.layer, self.mode = pipe, layer, mode

    def new_forward(self, block, hidden_states, *args, **kwargs):
        st, fn = state_of(self.pipe), self.mode["fn"]
        original = self.fn_ref.original_forward
        if fn is None or st is None or st.step < 0 or st.is_anchor or not all(
                int(st.plan.tokens[st.step, self.layer, i]) == REUSE for i in range(len(st.plan.modules))):
            return original(hidden_states, *args, **kwargs)
        if fn == "skip":
            return hidden_states
        attn = st.caches.get((st.branch, self.layer, "attn"))
        mlp = st.caches.get((st.branch, self.layer, "mlp"))
        if attn is None or mlp is None:
            return original(hidden_states, *args, **kwargs)
        key = (self.layer, st.step, st.branch)
        if self.mode.get("gates_given") and key in self.mode["gates"]:
            gate_attn, gate_mlp = self.mode["gates"][key]
        else:
            _, gate_attn, _, _, gate_mlp = block.norm1(hidden_states[:, :1], kwargs.get("timestep"),
                                                       kwargs.get("class_labels"), hidden_dtype=hidden_states.dtype)
            self.mode["gates"][key] = (gate_attn, gate_mlp)
        return fn(hidden_states, gate_attn, attn.out, gate_mlp, mlp.out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    pipe = load_pipeline("fmnist-dit", "bf16")
    labels = [i % 10 for i in range(8)]
    run = dict(sampler="ddim", steps=50, guidance_scale=3.0, seed=0, batch_size=8, progress=False,
               count_flops=False)
    plan = make_plan("fora", model_shape(pipe.transformer, 50), interval=args.interval)
    mode = {"fn": None, "gates": {}, "gates_given": False}
    paths = {"module hooks": None, "module hooks, conditioning per step": "per-step", "block, eager": combine,
             "block, compiled": torch.compile(combine, dynamic=False),
             "block, compiled, gates given": "compiled+gates", "no block work": "skip"}

    def attach(batch_conditioning=True):
        apply(pipe, plan, batch_conditioning=batch_conditioning)
        for layer, (_, block, _) in enumerate(find_blocks(pipe.transformer)):
            registry = HookRegistry.check_if_exists_or_initialize(block)
            if registry.get_hook("experiment") is None:
                registry.register_hook(BlockReuse(pipe, layer, mode), "experiment")

    def use(name: str) -> None:
        """Run the next samples through path ``name`` ("full": the unplanned model)."""
        if name == "full":
            remove(pipe)
            return
        fn = paths[name]
        attach(fn != "per-step")
        mode["gates_given"] = fn == "compiled+gates"  # gates kept by the runs before it
        mode["fn"] = paths["block, compiled"] if mode["gates_given"] else None if fn == "per-step" else fn

    attach()
    reference = sample(pipe, labels, **run)[0]
    for name, fn in paths.items():
        if fn == "skip":
            continue
        use(name)
        print(f"{name}: images bit-identical to the runtime's: {torch.equal(sample(pipe, labels, **run)[0], reference)}")
    timer = CallTimer(pipe.transformer)
    wall = {k: [] for k in ["full", *paths]}
    reuse_ms = {k: [] for k in paths}
    names = list(wall)
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # no path always first
            use(name)
            timer.start()
            wall[name].append(sample(pipe, labels, **run)[1].wall_s)
            calls = timer.stop()
            if name != "full":
                reuse_ms[name].append(1e3 * statistics.median(
                    [c for c, a in zip(calls, plan.anchors.tolist()) if not a]))
    for name in paths:
        speedup = statistics.median(f / w for f, w in zip(wall["full"], wall[name]))
        print(f"{name}: FORA-{args.interval} {speedup:.2f}x measured, reusing call "
              f"{statistics.median(reuse_ms[name]):.1f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
