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
several small ones).  A plan that accelerates nothing (``plan.full_plan``) registers no hook: it
stays the plain model's computation, bit for bit.  Which submodules form the chain is registry
data (``BlockSpec.conditioning_chain``).
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
        """Whether the block itself runs its chain at ``step`` (else only the first module may be
        asked for, by the transformer: DiT's final layer reads block 0's embedding)."""
        collapsed = self.state.collapse_steps
        return not (collapsed is not None and collapsed[step]) and not self.norm_served[step]

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
        # computes as the model does, so a trajectory's FLOPs stay those of step-by-step conditioning
        served = ("chain served", self.layer)
        if served in st.call_memo:
            return original(*args, **kwargs)
        st.call_memo[served] = True
        return table.rows[st.step][0]

    def _build(self, original, named: dict, t: torch.Tensor, labels, kind: bool):
        """The table for this and the later steps of the same kind (the block runs its chain
        there, or not: then the first module only), so nothing is computed that no call will ask
        for."""
        st, plan = self.state, self.state.plan
        if not torch.is_tensor(t) or t.ndim != 1 or (labels is not None and not torch.is_tensor(labels)) \
                or not st.on_schedule(t):
            return False
        steps = [s for s in range(st.step, plan.num_steps) if self._runs_chain(s) == kind]
        sched = st.scheduler.timesteps
        batched = {**named, self.timestep_arg: torch.cat([sched[s].to(t).expand_as(t) for s in steps])}
        if labels is not None:
            batched[self.labels_arg] = labels.repeat(len(steps))
        outs = [original(**batched)]
        for module in self.chain[1:] if kind else ():  # (their hooks see a tensor of no step: they run the module)
            outs.append(module(outs[-1]))
        if any(not torch.is_tensor(o) or o.shape[0] != len(steps) * t.shape[0] for o in outs):
            return False
        per_step = zip(*(o.split(t.shape[0]) for o in outs))
        return ChainTable(dict(zip(steps, per_step)), labels)


class ChainTable:
    """One block's conditioning chain outputs per step (``rows``: step -> one
    (batch rows, D) tensor per module), for the class labels it was built with (kept by reference;
    other labels are compared by value once per transformer call)."""

    def __init__(self, rows: dict[int, tuple[torch.Tensor, ...]], labels):
        self.rows, self.labels = rows, labels

    def serves(self, labels, memo: dict) -> bool:
        if labels is self.labels:
            return True
        if labels is None or self.labels is None:
            return False
        key = ("labels", id(labels), id(self.labels))
        if key not in memo:
            memo[key] = labels.shape == self.labels.shape and torch.equal(labels, self.labels)
        return memo[key]
