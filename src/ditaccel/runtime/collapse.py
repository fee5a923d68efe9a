"""Collapsed reusing steps: a step on which every module of every block returns its cache (FORA's,
Δ-DiT's and SODA's cache-only steps) computes the transformer body as one weighted sum.

A block whose registry entry has a :class:`~ditaccel.runtime.adapters.Residual` form computes
``x + sum_r gate_r * out_r`` from its modules' outputs ``out_r``.  When every module of every block
reuses its cache, the whole stack of blocks is therefore

    x_L = x_0 + sum_{l, r} gate_{l, r}(t) * C_{l, r}

with this step's gates and the cached (or forecast) outputs ``C``.  The first block's hook
computes that sum over all layers at once (one fused multiply-add per cached output, two with
forecasts; the gates of a whole trajectory's collapsed steps read at once from the blocks'
conditioning chain tables built at its first step (``runtime.embed``), or, where the registry
names no chunks for them, computed in one batched call of each block's conditioning norm), and
the other blocks pass their input through: one or two ops per cached output instead of a dozen
per block.  The values are the ones the block-by-block path computes, summed in another order
(fp32: within rounding; bf16: the sum rounds once instead of after every block).

With ``Plan.gating == "cached"`` the gates are instead the ones each cached output was computed
with (read from the block's conditioning norm, or its table, as the block ran on that step), so
that each block's whole gated contribution ``gate_{l, r}(a) * C_{l, r}(a)`` is what is reused (or
extrapolated from the last two full computes); no gate of the collapsed step itself is needed.

Falls back to the blocks' own forwards (the per-module path, this step's gates) for a call it
cannot serve: a cache that is missing or invalid, gates that cannot be computed ahead (or, cached
gating, were not seen when the output was computed), GLIGEN inputs.
"""

from __future__ import annotations


import torch
from diffusers.hooks import ModelHook

from ..plan import FULL, REUSE, Plan
from .adapters import Residual
from .embed import ChainTable
from .state import RunState, finite_probe

COLLAPSE_HOOK = "ditaccel.collapse"


def collapsible_steps(plan: Plan) -> list[bool]:
    """Per step, whether every module of every block reuses its cache (and nothing is routed)."""
    steps = (~plan.anchors) & (plan.tokens == REUSE).flatten(1).all(1)
    if plan.route is not None:
        steps &= (plan.route == FULL).all(1)
    return [bool(s) for s in steps]


def _beneath(module: torch.nn.Module, hook_name: str):
    """``module``'s forward beneath ditaccel's hook ``hook_name`` (the module itself where that
    hook is not registered): a call the runtime makes for itself is not one the hook should act on."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(hook_name) if registry is not None else None
    return hook.fn_ref.original_forward if hook is not None else module


def _part(value, index: int | None):
    """Element ``index`` of a module's tuple output (the value itself where ``index`` is None)."""
    if index is None or value is None:
        return value
    return value[index] if isinstance(value, tuple) and index < len(value) else None


def _history(cache):
    """(b, a): the steps of a cache's two last full outputs, for a first-order forecast; None
    where it has only one."""
    if cache.prev is None or cache.out_step is None or cache.prev_step is None or cache.out_step <= cache.prev_step:
        return None
    return cache.prev_step, cache.out_step


class Collapse:
    """What the block hooks of one applied plan share: which steps collapse, the slots (layer,
    role) in summing order, and the gate tables per guidance branch."""

    def __init__(self, state: RunState, blocks: list[torch.nn.Module], residual: Residual,
                 roles: tuple[str, ...], norm_hook: str, batched: bool = True, transformer=None):
        self.state, self.blocks, self.residual, self.roles = state, blocks, residual, roles
        self.norm_hook, self.batched, self.transformer = norm_hook, batched, transformer
        self.steps = collapsible_steps(state.plan)
        self.slots = [(layer, role) for layer in range(len(blocks)) for role in roles]
        self.slot_index = [(layer, state.plan.module_index(role)) for layer, role in self.slots]
        self.parts = [residual.part.get(role) for _, role in self.slots]  # of a tuple output, if any
        self._gates: dict[int, tuple] = {}
        self._embeds: dict[int, tuple] = {}  # per branch: (generation, the embedding table or None)
        self._chain: dict[int, tuple] = {}
        # Plan.gating "cached": per (branch, layer) (generation, {step: {role: (B, D) gates}}) of the
        # steps the block ran on whose outputs a cache still holds, and the layer whose norm is
        # being read (only during that block's own forward)
        self.cached = state.plan.gating == "cached"
        self._seen: dict[tuple[int, int], tuple[int, dict]] = {}
        self._stacked: dict[tuple, torch.Tensor] = {}
        self.capturing: int | None = None

    @classmethod
    def build(cls, state: RunState, blocks, per_block: list[dict], norm_hook: str,
              batched: bool = True, transformer=None) -> "Collapse | None":
        """The collapse for this plan on these blocks (``(name, block, spec)``), or None where no
        step collapses or the blocks do not say how their output is made.  ``batched``: compute
        the gates of a trajectory's collapsed steps in one call per block (else step by step);
        ``transformer``: the model the blocks are in (for a ``Residual.embed``)."""
        plan = state.plan
        if not any(collapsible_steps(plan)):
            return None
        forms = [spec.residual_of(block) for _, block, spec in blocks]
        if any(f is None for f in forms) or len(set(map(id, forms))) != 1:
            return None
        # every module a block has must be one the plan caches (else it would compute fresh)
        roles = tuple(r for r in plan.modules if r in per_block[0])
        if any(set(mods) != set(roles) for mods in per_block):
            return None
        return cls(state, [b for _, b, _ in blocks], forms[0], roles, norm_hook, batched, transformer)

    # -- the step ---------------------------------------------------------------------------------
    def run(self, named: dict, image_arg: str) -> torch.Tensor | None:
        """The output of the last block for this call, or None to run the blocks as usual.

        ``x + sum_k gate_k * C_k`` as one fused multiply-add per slot into one buffer, straight
        from the caches (no stacked copy, no temporary the size of all caches); a forecast
        ``C_k = prev_k + w_k (out_k - prev_k)`` is two, with the gates scaled by ``1 - w_k`` and
        ``w_k`` (two ops for all slots)."""
        st = self.state
        x = named.get(image_arg)
        kwargs = named.get("cross_attention_kwargs") or {}
        if not torch.is_tensor(x) or x.ndim != 3 or "gligen" in kwargs:
            return None
        if any(st.call_kwargs.get(k) is not None for k in self.residual.unless):
            return None
        caches = [st.caches.get((st.branch, layer, role)) for layer, role in self.slots]
        if any(c is None or not c.valid(x, st.generation) for c in caches):
            return None
        outs = [_part(c.out, p) for c, p in zip(caches, self.parts)]
        if any(not torch.is_tensor(o) for o in outs):
            return None
        fill = st.fill_list[st.step]
        history = ([_history(c) if fill[layer][m] else None for c, (layer, m) in zip(caches, self.slot_index)]
                   if st.plan.forecast else [None] * len(caches))
        if self.cached:
            g = self._gates_then(caches, x, [c.out_step for c in caches])
            g_then = g if not any(h is not None for h in history) else \
                self._gates_then(caches, x, [c.out_step if h is None else h[0] for c, h in zip(caches, history)])
            if g is None or g_then is None:
                return None
        else:
            gates = self._gates_now(named, x)
            if gates is None:
                return None
            g = g_then = gates.to(x.dtype).unsqueeze(2)                        # (K, B, 1, D)
        if any(h is not None for h in history):
            w = torch.tensor([0.0 if h is None else (st.step - h[0]) / (h[1] - h[0]) for h in history],
                             dtype=torch.float32).to(device=x.device)
            wk = w.to(x.dtype)[:, None, None, None]
            g_new = g * wk                                                       # weight of out_k
            g_old = g - g_new if g_then is g else g_then - g_then * wk            # weight of prev_k
            prevs = [_part(c.prev, p) if h is not None else o for c, p, h, o in zip(caches, self.parts, history, outs)]
            terms = list(zip(g_old.unbind(0), prevs))
            terms += [(b, o) for b, o, h in zip(g_new.unbind(0), outs, history) if h is not None]
            # read only after a non-finite transformer output, to name the slot
            st.watch_lazily(self.slots, lambda: torch.stack([
                torch.isfinite(finite_probe(a + wk * (o - a))) if h is not None else torch.isfinite(finite_probe(o))
                for a, o, h, wk in zip(prevs, outs, history, w.tolist())]))
        else:
            terms = list(zip(g.unbind(0), outs))
        # into a contiguous buffer: the patch embedding's output is a transposed view, and in-place
        # updates of a buffer laid out like it (not like the caches) take a strided path several
        # times slower on a CPU
        out = torch.addcmul(x, terms[0][0], terms[0][1], out=torch.empty_like(x, memory_format=torch.contiguous_format))
        for gate, value in terms[1:]:
            out.addcmul_(gate, value)
        record = st.records[-1].computed
        for slot in self.slots:
            record[slot] = 0
        return out

    # -- gates ------------------------------------------------------------------------------------
    def _gates_then(self, caches, x: torch.Tensor, steps: list) -> torch.Tensor | None:
        """(K, B, 1, D) gates of each slot at the step given for it (the ones its block ran with
        then), or None where one was not seen."""
        st = self.state
        key = (st.branch, st.generation, tuple(steps), x.dtype)
        held = self._stacked.get(key)
        if held is None:
            per_slot = []
            for (layer, role), step in zip(self.slots, steps):
                seen = self._seen.get((st.branch, layer))
                gates = None if seen is None or seen[0] != st.generation else seen[1].get(step)
                if gates is None or gates[role].shape[0] != x.shape[0]:
                    return None
                per_slot.append(gates[role])
            held = torch.stack(per_slot).to(x.dtype).unsqueeze(2)
            self._stacked = {k: v for k, v in self._stacked.items() if k[1] == st.generation}  # (this trajectory's)
            self._stacked[key] = held
        return held

    def keep_gates(self, layer: int, gates: dict) -> None:
        """Cached gating: the gates (role -> (B, D)) block ``layer`` ran with at this step."""
        st = self.state
        key = (st.branch, layer)
        seen = self._seen.get(key)
        if seen is None or seen[0] != st.generation:
            seen = self._seen[key] = (st.generation, {})
        seen[1][st.step] = gates

    def _keep_roles(self, layer: int, gate_at) -> None:
        """Cached gating: :meth:`keep_gates` of role ``r``'s gate ``gate_at(Residual.index[r])``
        (ones for a role the residual adds ungated)."""
        index = self.residual.index
        gates = {r: gate_at(i).detach() for r, i in index.items() if r in self.roles}
        like = next(iter(gates.values()))
        self.keep_gates(layer, {r: gates[r] if r in gates else torch.ones_like(like) for r in self.roles})

    def seen_norm(self, layer: int, out) -> None:
        """Cached gating: the outputs of block ``layer``'s conditioning norm in its own forward."""
        if self.capturing == layer and isinstance(out, tuple):
            self._keep_roles(layer, lambda i: out[i])

    def seen_table(self, layer: int, named: dict, x: torch.Tensor) -> None:
        """Cached gating, ``Residual.source == "table"``: the block's gates from its table and argument."""
        res = self.residual
        emb = named.get(res.table_arg)
        if torch.is_tensor(emb):
            chunks = getattr(self.blocks[layer], res.table)[None] + emb.reshape(x.shape[0], res.chunks, -1)
            self._keep_roles(layer, lambda i: chunks[:, i])

    def forget(self, layer: int) -> None:
        """Cached gating: drop the gates of steps whose outputs no cache of block ``layer`` holds."""
        st = self.state
        seen = self._seen.get((st.branch, layer))
        if seen is None:
            return
        held = set()
        for role in self.roles:
            c = st.caches.get((st.branch, layer, role))
            if c is not None:
                held |= {c.out_step, c.prev_step}
        for step in [s for s in seen[1] if s not in held]:
            del seen[1][step]

    def _gates_now(self, named: dict, x: torch.Tensor) -> torch.Tensor | None:
        """(K, B, D) gates of every slot at this step (ones for ungated roles)."""
        res = self.residual
        if res.source == "table":
            emb = named.get(res.table_arg)
            if not torch.is_tensor(emb):
                return None
            rows = x.shape[0]
            table = torch.stack([getattr(b, res.table) for b in self.blocks])    # (L, chunks, D)
            chunks = table[:, None] + emb.reshape(rows, res.chunks, -1)[None]     # (L, B, chunks, D)
            return self._assemble(lambda role: chunks[:, :, res.index[role]], x)
        if res.source == "norm":
            return self._norm_gates(named, x)
        return None

    def _assemble(self, gate_of, x: torch.Tensor) -> torch.Tensor:
        """(K, B, D) in slot order from ``gate_of(role) -> (L, B, D)``."""
        per_role = [gate_of(r) if r in self.residual.index else x.new_ones(len(self.blocks), x.shape[0], x.shape[-1])
                    for r in self.roles]
        return torch.stack(per_role, dim=1).flatten(0, 1)

    def _norm_gates(self, named: dict, x: torch.Tensor) -> torch.Tensor | None:
        """From each block's conditioning norm: the gates of all this trajectory's collapsed steps,
        computed at the first of them in one batched call per block (where the pipeline's
        scheduler says which timesteps are coming), looked up after; a call whose timestep or
        labels differ from the predicted ones computes its own."""
        st, res = self.state, self.residual
        args = {a: named.get(a) for a in res.norm_args}
        if "timestep" not in res.norm_args:  # conditioned on an embedding (SD3's temb)
            if any(not torch.is_tensor(a) for a in args.values()):
                return None
            gates = self._embed_gates(x, args) if self.batched and res.embed else None
            return gates if gates is not None else self._norm_call(x[:, :1], args, x.dtype, 1)[0]
        t = args.get("timestep")
        if not torch.is_tensor(t) or t.ndim != 1:
            return None
        labels = args.get("class_labels")
        if not self.batched:
            return self._norm_call(x[:, :1], args, x.dtype, 1)[0]
        gates = self._chain_gates(t, labels)
        if gates is not None:
            return gates
        held = self._gates.get(st.branch)
        if held is None or held[0] != st.generation:
            held = (st.generation, self._gate_table(x, args))
            self._gates[st.branch] = held
        table = held[1]
        if table is not None:
            steps, timesteps, held_labels, gates = table
            i = steps.get(st.step)
            rows = x.shape[0]
            if (i is not None and torch.equal(t, timesteps[i * rows:(i + 1) * rows])
                    and (labels is None) == (held_labels is None)
                    and (labels is None or torch.equal(labels, held_labels))):
                return gates[i]
        return self._norm_call(x[:, :1], args, x.dtype, 1)[0]

    def _embed_gates(self, x: torch.Tensor, args: dict) -> torch.Tensor | None:
        """(K, B, D) gates of this step from a table of all this trajectory's collapsed steps,
        made at the first of them (:meth:`_embed_table`); None where the block's conditioning is
        not the table's row for this step (the transformer embedded this call itself: it is off
        the scheduler's timesteps or its other embedding arguments differ from the table's)."""
        st, res = self.state, self.residual
        held = self._embeds.get(st.branch)
        if held is None or held[0] != st.generation:
            call = self._embed_call()
            held = self._embeds[st.branch] = (st.generation, None if call is None else self._embed_table(x, args, call))
        table = held[1]
        if table is None:
            return None
        rows, _, gates = table
        row = rows.get(st.step)
        return gates[row[0]] if row is not None and args[res.norm_args[0]] is row[1] else None

    def _embed_call(self) -> list | None:
        """The transformer call's ``Residual.embed_args``, where it is on the scheduler's timesteps."""
        st = self.state
        call = [st.call_kwargs.get(a) for a in self.residual.embed_args]
        if self.transformer is None or any(not torch.is_tensor(c) for c in call) or not st.on_schedule(call[0]):
            return None
        return call

    def _embed_table(self, x: torch.Tensor, args: dict, call: list):
        """(step -> (i, the embedding its blocks get), the call's other embedding arguments,
        (steps, K, B, D) gates) for this and the later collapsed steps: the later steps' embeddings
        made here in one call of the transformer's ``Residual.embed`` module, which then returns
        them on those steps (:class:`EmbedHook`), so each step's conditioning is computed once, as
        the model does."""
        st, res = self.state, self.residual
        t, others = call[0], call[1:]
        steps = [s for s in range(st.step, st.plan.num_steps) if self.steps[s]]
        given = args[res.norm_args[0]]
        embs = [given]
        if len(steps) > 1:
            batched = [st.timesteps_at(steps[1:], t)] + [o.repeat(len(steps) - 1, *[1] * (o.ndim - 1)) for o in others]
            later = getattr(self.transformer, res.embed)(*batched)
            if not torch.is_tensor(later) or later.shape != ((len(steps) - 1) * t.shape[0], *given.shape[1:]):
                return None
            embs += list(later.split(t.shape[0]))
        emb = torch.cat(embs)
        gates = self._norm_call(x[:, :1].repeat(len(steps), 1, 1), {**args, res.norm_args[0]: emb}, x.dtype, len(steps))
        return {s: (i, e) for i, (s, e) in enumerate(zip(steps, embs))}, list(others), gates

    def served_embedding(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The embedding the table holds for this call of the ``Residual.embed`` module (its
        arguments the transformer call's own, this step in the table), else None."""
        st = self.state
        if st.step < 0 or not self.steps[st.step] or kwargs:
            return None
        held = self._embeds.get(st.branch)
        if held is None or held[0] != st.generation or held[1] is None:
            return None
        rows, others, _ = held[1]
        row = rows.get(st.step)
        call = self._embed_call()
        if row is None or call is None or len(args) != len(call) or any(a is not c for a, c in zip(args, call)):
            return None
        if any(c is not h and not (c.shape == h.shape and torch.equal(c, h)) for c, h in zip(call[1:], others)):
            return None
        return row[1]

    def _chain_gates(self, t: torch.Tensor, labels) -> torch.Tensor | None:
        """(K, B, D) gates of this step read from the blocks' conditioning chain tables
        (``runtime.embed``: built at the trajectory's first step, collapsed steps included), for
        all collapsed steps at once at the first of them; None where the registry names no chunks
        or a table does not serve this call.  Each table then counts as asked for in this call
        (the output head's embedding is computed again, as the model does)."""
        st, res = self.state, self.residual
        if not res.chain_index:
            return None
        tables = [st.embed_tables.get((layer, st.branch, True)) for layer in range(len(self.blocks))]
        if any(not isinstance(tb, ChainTable) or not tb.outputs or st.step not in tb.rows
               or tb.labels is not tables[0].labels for tb in tables):
            return None
        if not st.on_schedule(t) or not tables[0].serves(labels, st.call_memo):
            return None
        held = self._chain.get(st.branch)
        if held is None or held[0] is not tables[0]:
            held = (tables[0], *self._chain_table(tables))
            self._chain[st.branch] = held
        _, index, gates = held
        i = index.get(st.step)
        if i is None:
            return None
        for layer in range(len(self.blocks)):
            st.call_memo[("chain served", layer)] = True
        return gates[i]

    def _chain_table(self, tables: list) -> tuple[dict[int, int], torch.Tensor]:
        """(step -> i, (steps, K, B, D) gates) of the collapsed steps the tables hold."""
        res = self.residual
        steps = [s for s in tables[0].steps if self.steps[s]]
        per_layer = []
        for tb in tables:
            last = tb.outputs[-1]
            at = {s: i for i, s in enumerate(tb.steps)}
            rows = last.shape[0] // len(tb.steps)
            chunks = last.unflatten(0, (len(tb.steps), rows)).unflatten(-1, (res.chunks, -1))  # (n, B, C, D)
            per_layer.append(chunks[[at[s] for s in steps]])                     # (steps, B, C, D)
        stacked = torch.stack(per_layer, dim=1)                                   # (steps, L, B, C, D)
        ones = stacked.new_ones(stacked.shape[:3] + stacked.shape[-1:])
        per_role = [stacked[..., res.chain_index[r], :] if r in res.chain_index else ones for r in self.roles]
        gates = torch.stack(per_role, dim=2).flatten(1, 2)                        # (steps, K, B, D)
        return {s: i for i, s in enumerate(steps)}, gates

    def _gate_table(self, x: torch.Tensor, args: dict):
        st = self.state
        sched = getattr(st.scheduler, "timesteps", None)
        t = args["timestep"]
        if not torch.is_tensor(sched) or len(sched) != st.plan.num_steps:
            return None
        if not torch.equal(t, sched[st.step].to(t).expand_as(t)):
            return None
        steps = [s for s in range(st.step, st.plan.num_steps) if self.steps[s]]
        timesteps = st.timesteps_at(steps, t)
        labels = args.get("class_labels")
        batched = {**args, "timestep": timesteps}
        if torch.is_tensor(labels):
            batched["class_labels"] = labels.repeat(len(steps))
        gates = self._norm_call(x[:, :1].repeat(len(steps), 1, 1), batched, x.dtype, len(steps))
        return ({s: i for i, s in enumerate(steps)}, timesteps, None if labels is None else labels.clone(), gates)

    def _norm_call(self, x1: torch.Tensor, args: dict, dtype, steps: int) -> torch.Tensor:
        """(steps, K, B, D): each block's norm on ``x1`` (one token per row) and ``args``."""
        res = self.residual
        extra = {res.dtype_kwarg: dtype} if res.dtype_kwarg else {}
        args = {res.norm_kwargs.get(k, k): v for k, v in args.items()}
        per_layer = []
        for block in self.blocks:
            outs = _beneath(getattr(block, res.norm), self.norm_hook)(x1, **args, **extra)
            per_layer.append(outs)
        rows = x1.shape[0] // steps
        gates = self._assemble(lambda role: torch.stack([o[res.index[role]] for o in per_layer]), x1[:, 0])
        return gates.unflatten(1, (steps, rows)).transpose(0, 1)                  # (steps, K, B, D)


class EmbedHook(ModelHook):
    """On the transformer's ``Residual.embed`` module (SD3's ``time_text_embed``): on a collapsed
    step whose embedding the collapse's table holds, that row (made with the table at the
    trajectory's first collapsed step), else the module's own output."""

    def __init__(self, collapse: Collapse):
        super().__init__()
        self.collapse = collapse

    def new_forward(self, module, *args, **kwargs):
        served = self.collapse.served_embedding(args, kwargs)
        return served if served is not None else self.fn_ref.original_forward(*args, **kwargs)


class GateHook(ModelHook):
    """Cached gating (``Plan.gating == "cached"``), on each block's conditioning norm: hands the
    collapse the gates the block computes in its own forward."""

    def __init__(self, collapse: Collapse, layer: int):
        super().__init__()
        self.collapse, self.layer = collapse, layer

    def new_forward(self, module, *args, **kwargs):
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.collapse.seen_norm(self.layer, out)
        return out


class CollapseHook(ModelHook):
    """On each block: on a collapsed step, the first block returns the whole stack's output
    (:meth:`Collapse.run`) and the others pass it through; elsewhere the block runs as usual."""

    def __init__(self, state: RunState, layer: int, collapse: Collapse, block: torch.nn.Module, image_arg: str,
                 text_arg: str | None = None, image_output: int | None = None):
        super().__init__()
        self.state, self.layer, self.collapse, self.image_arg = state, layer, collapse, image_arg
        self.text_arg, self.image_output = text_arg, image_output
        from .hooks import positional

        self.signature = positional(type(block))

    def _returned(self, image: torch.Tensor, named: dict):
        """What the block returns: the image tokens, or for a two-stream block the pair with its
        text input passed through (the next blocks' attention is collapsed too, and the
        transformer discards the last block's text stream)."""
        if self.image_output is None:
            return image
        out = [named.get(self.text_arg)] * 2
        out[self.image_output] = image
        return tuple(out)

    def new_forward(self, block, *args, **kwargs):
        st = self.state
        original = self.fn_ref.original_forward
        if st.program is None and st.step >= 0 and st.routed_tokens is None and self.collapse.steps[st.step]:
            from .hooks import _named

            if self.layer == 0:
                named = _named(self.signature, args, kwargs)
                out = self.collapse.run(named, self.image_arg)
                st.collapsed = out is not None
                if out is not None:
                    return self._returned(out, named)
            elif st.collapsed:
                if self.image_output is None:
                    return args[0] if args else kwargs[self.image_arg]
                named = _named(self.signature, args, kwargs)
                return self._returned(named[self.image_arg], named)
        collapse = self.collapse
        if not collapse.cached or st.program is not None or st.step < 0 or st.routed_tokens is not None:
            return original(*args, **kwargs)
        # cached gating: the gates this block runs with now, for the collapsed steps reusing its outputs
        if collapse.residual.source == "table":
            from .hooks import _named

            named = _named(self.signature, args, kwargs)
            x = named.get(self.image_arg)
            if torch.is_tensor(x):
                collapse.seen_table(self.layer, named, x)
        collapse.capturing = self.layer
        try:
            out = original(*args, **kwargs)
        finally:
            collapse.capturing = None
        collapse.forget(self.layer)
        return out
