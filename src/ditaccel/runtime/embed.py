"""Per-block conditioning served from a table for a whole trajectory.

DiT's blocks each embed the call's timestep and class label again and project the embedding to
their adaLN parameters (``norm1.emb``, ``norm1.silu``, ``norm1.linear`` of every
``AdaLayerNormZero``: sinusoidal projection, three linears, a label lookup: about twenty-five ops per
block, the same number however few tokens the block computes; in a full DiT call, about a third of
its ops).  Those outputs depend on the timestep and the labels alone, both known for the whole
trajectory once the scheduler has set its timesteps.  Under a plan that accelerates any step,
:class:`ChainHook` serves each module of that chain, on every step, from one batched call made at
the trajectory's first step for all of them: a partially recomputed or routed block then
dispatches fewer ops than the block computed in full, and so does a full-compute step (its
conditioning then differs from the plain model's by the rounding of one batched matmul against
several small ones).  The table covers the collapsed steps too (``runtime.collapse``): their gates
are chunks of the chain's last output, read from it for all of them at once.  A plan that
accelerates nothing (``plan.full_plan``) registers no hook: it stays the plain model's
computation, bit for bit.  Which submodules form the chain is registry data
(``BlockSpec.conditioning_chain``).
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from .hooks import _named, positional

EMBED_HOOK = "ditaccel.embed"


class ChainHook(ModelHook):
    """On module ``position`` of one block's conditioning chain: the first module takes
    ``(timestep, class_labels, ...)`` (one row per batch row), each later one the previous one's
    output alone.  On a step of a trajectory that follows the scheduler, the first module called
    with the transformer call's own timestep and labels returns that step's rows of a table built
    at the first call for the rest of the trajectory (the chain run once on all their timesteps),
    and each later module called with exactly the tensor the table gave the one before returns
    its own rows.  Every other call (a timestep off the schedule, other labels, the runtime's own
    batched calls, compiled programs) runs the module."""

    def __init__(self, state, layer: int, position: int, chain: tuple[torch.nn.Module, ...],
                 norm_served: list[bool], timestep_arg: str = "timestep", labels_arg: str = "class_labels"):
        super().__init__()
        self.state, self.layer, self.position, self.chain = state, layer, position, chain
        # the steps on which the block's conditioning norm is served whole from its own table
        # (hooks.NormSkipHook): the chain is not called there
        self.norm_served = norm_served
        self.signature = positional(type(chain[0]))
        self.timestep_arg, self.labels_arg = timestep_arg, labels_arg

    def _runs_chain(self, step: int) -> bool:
        """Whether the whole chain is asked for at ``step``: by the block itself, or on a collapsed
        step by the collapse for its gates (else only the first module may be asked for, by the
        transformer: DiT's final layer reads block 0's embedding)."""
        collapsed = self.state.collapse_steps
        return (collapsed is not None and collapsed[step]) or not self.norm_served[step]

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        original = self.fn_ref.original_forward
        if st.program is not None or st.step < 0 or st.scheduler is None:
            return original(*args, **kwargs)
        kind = self._runs_chain(st.step)
        key = (self.layer, st.branch, kind)
        if self.position:  # served only right after the module before it was
            table = st.embed_tables.get(key)
            served = table.rows.get(st.step) if table else None
            if served is not None and len(served) > self.position and len(args) == 1 and not kwargs \
                    and args[0] is served[self.position - 1]:
                return served[self.position]
            return original(*args, **kwargs)
        named = _named(self.signature, args, kwargs)
        t, labels = named.get(self.timestep_arg), named.get(self.labels_arg)
        if t is None or t is not st.call_kwargs.get(self.timestep_arg) \
                or labels is not st.call_kwargs.get(self.labels_arg):
            return original(*args, **kwargs)  # not the call's own conditioning (a batched table call)
        table = st.embed_tables.get(key)
        if table is None:
            table = st.embed_tables[key] = self._build(original, named, t, labels, kind)
        if table is False or not st.on_schedule(t) or not table.serves(labels, st.call_memo) \
                or st.step not in table.rows:
            return original(*args, **kwargs)
        # once per call: a second request (DiT's output head embeds again with block 0's embedder)
        # computes as the model does, so a trajectory's FLOPs stay those of step-by-step
        # conditioning (what SODA's FLOP budget counts); on a collapsed step, whose gates were read
        # from the table, it is served from a table of its own (the embedding computed once more,
        # for all collapsed steps at once)
        served = ("chain served", self.layer)
        if served not in st.call_memo:
            st.call_memo[served] = True
            return table.rows[st.step][0]
        if not (st.collapsed and kind):
            return original(*args, **kwargs)
        again = (self.layer, st.branch, "again")
        if again not in st.embed_tables:
            st.embed_tables[again] = self._build(original, named, t, labels, kind, first_only=True,
                                                 steps=[s for s in table.rows if s >= st.step and st.collapse_steps[s]])
        table = st.embed_tables[again]
        if table is False or st.step not in table.rows:
            return original(*args, **kwargs)
        return table.rows[st.step][0]

    def _build(self, original, named: dict, t: torch.Tensor, labels, kind: bool, first_only: bool = False,
               steps: list[int] | None = None):
        """The table for this and the later steps of the same kind (the whole chain is asked for
        there, or not: then the first module only), so nothing is computed that no call will ask
        for; ``steps``: for these steps instead, ``first_only``: the first module only."""
        st, plan = self.state, self.state.plan
        if not torch.is_tensor(t) or t.ndim != 1 or (labels is not None and not torch.is_tensor(labels)) \
                or not st.on_schedule(t):
            return False
        if steps is None:
            steps = [s for s in range(st.step, plan.num_steps) if self._runs_chain(s) == kind]
        batched = {**named, self.timestep_arg: st.timesteps_at(steps, t)}
        if labels is not None:
            batched[self.labels_arg] = labels.repeat(len(steps))
        outs = [original(**batched)]
        for module in self.chain[1:] if kind and not first_only else ():
            outs.append(module(outs[-1]))  # (their hooks see a tensor of no step: they run the module)
        if any(not torch.is_tensor(o) or o.shape[0] != len(steps) * t.shape[0] for o in outs):
            return False
        per_step = zip(*(o.split(t.shape[0]) for o in outs))
        return ChainTable(dict(zip(steps, per_step)), labels, steps, tuple(outs))


class ChainTable:
    """One block's conditioning chain outputs per step (``rows``: step -> one
    (batch rows, D) tensor per module), for the class labels it was built with (kept by reference;
    other labels are compared by value once per transformer call).  ``outputs``: each module's
    output for all of ``steps`` (step-major rows), of which ``rows`` are views."""

    def __init__(self, rows: dict[int, tuple[torch.Tensor, ...]], labels, steps: list[int] = (),
                 outputs: tuple[torch.Tensor, ...] = ()):
        self.rows, self.labels, self.steps, self.outputs = rows, labels, list(steps), outputs

    def serves(self, labels, memo: dict) -> bool:
        if labels is self.labels:
            return True
        if labels is None or self.labels is None:
            return False
        key = ("labels", id(labels), id(self.labels))
        if key not in memo:
            memo[key] = labels.shape == self.labels.shape and torch.equal(labels, self.labels)
        return memo[key]
