"""Compiled step programs (runtime.program, ``apply(..., compile=...)`` by steps): every step program
of a FORA, FORA-forecast, Δ-DiT, ToCa, SODA and Shiva plan traces with ``fullgraph=True`` (no graph
break: nothing waits for the device inside, which CUDA-graph capture needs), exactly one graph
per distinct step pattern, none more on a second generation, and the images and per-step records
of the eager runtime."""

import dataclasses

import numpy as np
import pytest
import torch

from ditaccel.methods import make_plan, model_shape
from ditaccel.plan import FULL, REUSE
from ditaccel.runtime import apply, remove, state_of
from ditaccel.runtime.program import CompileConfig
from ditaccel.runtime.state import PlanMismatch
from ditaccel.runtime.summary import per_step
from tests import archs
from tests.archs import ARCHS, TOKENS

T = 6
# compiled and eager images agree to fp32 rounding: the captured graph runs some ops in another
# form than eager (functionalized, decomposed), whose rounding depends on the CPU's vector width
# (up to 3e-6 seen on an AVX-512 Xeon); a wrong step program is off by orders of magnitude more
ATOL = 1e-5


class CountingBackend:
    """Runs each captured graph as is (aten ops unchanged) and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _records(pipe):
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in per_step(state_of(pipe))]


def _run(pipe, call, plan, **options):
    """(images, per-step records, graphs compiled by the first / by two generations, programs)."""
    backend = CountingBackend() if options.pop("counted", False) else None
    if backend is not None:
        options["compile"] = {"backend": backend, "fullgraph": True}
    apply(pipe, plan, **options)
    try:
        with torch.no_grad():
            images = torch.as_tensor(np.asarray(call(pipe, 2, 0, T)))
            first = None if backend is None else backend.graphs
            again = torch.as_tensor(np.asarray(call(pipe, 2, 0, T)))
        assert torch.equal(images, again), "a second generation gives the same images"
        records = _records(pipe)
        step_hook = pipe.transformer._diffusers_hook.get_hook("ditaccel.step")
        # one graph per step pattern and call signature (the guidance branches of one step
        # differ in text length in some pipelines)
        programs = None if step_hook.programs is None else len(step_hook.programs.variants)
    finally:
        remove(pipe)
    return images, records, first, None if backend is None else backend.graphs, programs


PLANS = {
    "fora-2": lambda shape: make_plan("fora", shape, interval=2),
    "fora-3-forecast": lambda shape: make_plan("fora", shape, interval=3, forecast=1),
    "delta-dit": lambda shape: make_plan("delta-dit", shape, interval=3, cached_blocks=1.0),
    "toca": lambda shape: make_plan("toca", shape, interval=3, ratio=0.5),
    "toca-forecast": lambda shape: make_plan("toca", shape, interval=3, ratio=0.5, forecast=1),
}


@pytest.mark.parametrize("arch", ["dit-pixel", "DiTPipeline", "PixArtAlphaPipeline"])
@pytest.mark.parametrize("name", list(PLANS))
def test_step_programs_trace_whole_once_per_pattern_and_give_the_eager_images(arch, name):
    torch._dynamo.reset()
    pipe, call = ARCHS[arch]()
    pipe.set_progress_bar_config(disable=True)
    plan = PLANS[name](model_shape(pipe.transformer, T))
    ref, ref_records, *_ = _run(pipe, call, plan)
    got, records, first, total, programs = _run(pipe, call, plan, counted=True)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert records == ref_records, "the programs compute what the eager path records"
    assert first == programs, "one graph per distinct step pattern"
    assert total == first, "a second generation compiles nothing"
    # FORA-2: the anchor and the reusing step; with forecasts the first reusing steps (no history
    # yet) differ from the later ones; the partial plans' recomputing steps are patterns too
    assert programs == {"fora-2": 2, "fora-3-forecast": 3, "delta-dit": 2, "toca": 2, "toca-forecast": 3}[name]


def test_a_per_entry_fill_in_step_programs_gives_the_eager_images():
    """ToCa with only the first block's first module forecasting (``Plan.fill``): its cache keeps
    full outputs on the steps it does not forecast too, in programs as in the eager path."""
    import dataclasses

    torch._dynamo.reset()
    pipe, call = ARCHS["dit-pixel"]()
    pipe.set_progress_bar_config(disable=True)
    plan = PLANS["toca"](model_shape(pipe.transformer, T))
    fill = torch.zeros_like(plan.tokens)
    fill[:, 0, 0] = 1
    plan = dataclasses.replace(plan, fill=fill)
    ref, ref_records, *_ = _run(pipe, call, plan)
    got, records, first, total, programs = _run(pipe, call, plan, counted=True)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert records == ref_records and first == programs == total
    plain, *_ = _run(pipe, call, PLANS["toca"](model_shape(pipe.transformer, T)))
    assert not torch.equal(plain, ref)


@pytest.mark.parametrize("arch", ["StableDiffusion3Pipeline", "FluxPipeline", "WanPipeline", "PixArtSigmaPipeline"])
def test_step_programs_of_every_family_trace_whole(arch):
    """Joint (SD3), Flux (single- and double-stream, RoPE) and Wan attention, partially recomputed
    with forecasts inside a program."""
    torch._dynamo.reset()
    pipe, call = ARCHS[arch]()
    pipe.set_progress_bar_config(disable=True)
    plan = PLANS["toca-forecast"](model_shape(pipe.transformer, T, TOKENS.get(arch)))
    ref, ref_records, *_ = _run(pipe, call, plan)
    got, records, first, total, programs = _run(pipe, call, plan, counted=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert records == ref_records and first == total == programs, (first, total, programs)


def test_the_full_plan_compiles_to_one_program_with_the_plain_images(tiny_pipe):
    """The unaccelerated model gets compiled too: the full plan is one program, and the images are
    the plain model's bit for bit (the backend runs the same ops)."""
    from ditaccel.plan import full_plan

    call = archs.dit_pixel()[1]
    shape = model_shape(tiny_pipe.transformer, T)
    with torch.no_grad():
        plain = torch.as_tensor(np.asarray(call(tiny_pipe, 2, 0, T)))
    torch._dynamo.reset()
    got, _, first, total, programs = _run(tiny_pipe, call, full_plan(T, shape.num_layers, shape.num_tokens, shape.modules),
                                          counted=True)
    assert torch.equal(got, plain)
    assert first == total == programs == 1


def _soda_plans():
    from diffusers import DDIMScheduler

    from ditaccel.methods import soda
    from ditaccel.models.reference import NOISE_SCHEDULE
    from ditaccel.pipeline import DiTPixelPipeline
    from ditaccel.profiling import profile
    from tests.conftest import timed_like_flops, tiny_dit

    pipe = DiTPixelPipeline(transformer=tiny_dit(), scheduler=DDIMScheduler(**NOISE_SCHEDULE))
    pipe.set_progress_bar_config(disable=True)
    prof = profile(pipe, class_labels=[0, 1], sampler="ddim", steps=T, guidance_scale=2.0, intervals=(1, 2, 3),
                   ratios=(0.25, 0.5), timing_repeats=1, progress=False)
    prof = timed_like_flops(prof)  # (partial recompute offered whatever this machine's timing noise)
    return pipe, [soda.plan(soda.Config(speedup=2.0), prof), soda.plan(soda.Config(speedup=1.5, lam=1.0), prof),
                  soda.plan(soda.Config(speedup=2.0, forecast=1), prof)]


def test_soda_step_programs_trace_whole():
    from ditaccel.sampling import sample

    pipe, plans = _soda_plans()
    assert any(bool((p.tokens[~p.anchors] > 0).any()) for p in plans), "a plan that recomputes tokens"
    for plan in plans:
        torch._dynamo.reset()
        apply(pipe, plan)
        ref, _ = sample(pipe, [0, 1], steps=T, guidance_scale=2.0, progress=False)
        backend = CountingBackend()
        apply(pipe, plan, compile={"backend": backend, "fullgraph": True})
        got, _ = sample(pipe, [0, 1], steps=T, guidance_scale=2.0, progress=False)
        programs = len(pipe.transformer._diffusers_hook.get_hook("ditaccel.step").programs.variants)
        remove(pipe)
        np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64), atol=1e-5)
        assert backend.graphs == programs


def test_shiva_step_programs_trace_whole_with_the_router_inside():
    from ditaccel.methods.shiva.policy import plan_from_ratios
    from ditaccel.methods.shiva.router import ShivaRouter

    torch._dynamo.reset()
    pipe, call = ARCHS["dit-pixel"]()
    pipe.set_progress_bar_config(disable=True)
    shape = model_shape(pipe.transformer, T)
    ratios = torch.ones(T, shape.num_layers, dtype=torch.float64)
    ratios[:, 1:] = torch.tensor([1.0, 0.75, 0.5, 0.5, 0.75, 0.75])[:, None]
    plan = plan_from_ratios(ratios, shape.num_tokens, shape.modules, multiple=4)
    router = ShivaRouter.for_model(pipe.transformer)
    ref, ref_records, *_ = _run(pipe, call, plan, router=router)
    # a route-only plan compiles by blocks unless told otherwise: here its steps are compiled whole
    backend = CountingBackend()
    apply(pipe, plan, router=router, compile=CompileConfig(scope="steps", options={"backend": backend, "fullgraph": True}))
    with torch.no_grad():
        steps = torch.as_tensor(np.asarray(call(pipe, 2, 0, T)))
    step_records = _records(pipe)
    programs = len(pipe.transformer._diffusers_hook.get_hook("ditaccel.step").programs.variants)
    remove(pipe)
    torch.testing.assert_close(steps, ref, atol=ATOL, rtol=0)
    assert step_records == ref_records
    assert backend.graphs == programs == 3  # steps route all, 12 or 8 of 16 tokens: three patterns


def test_scopes_and_refusals(tiny_pipe):
    shape = model_shape(tiny_pipe.transformer, T)
    plan = make_plan("fora", shape, interval=2)
    with pytest.raises(PlanMismatch, match="compile them by steps"):
        apply(tiny_pipe, plan, compile=CompileConfig(scope="blocks"))
    assert state_of(tiny_pipe) is None
    with pytest.raises(ValueError, match="compile scope"):
        CompileConfig(scope="layers")
    with pytest.raises(TypeError, match="compile must be"):
        apply(tiny_pipe, plan, compile="yes")
    assert CompileConfig.of({"mode": "reduce-overhead", "scope": "steps"}) == CompileConfig("steps", {"mode": "reduce-overhead"})
    assert CompileConfig.of(False) is None and CompileConfig.of(True) == CompileConfig()


def test_a_call_without_its_caches_computes_and_a_new_batch_size_starts_over(tiny_pipe):
    """A reusing step with nothing cached (a trajectory begun part way) is given a program that
    computes; a call with another batch size never reads the caches of the old one."""
    shape = model_shape(tiny_pipe.transformer, T)
    plan = make_plan("fora", shape, interval=3)
    call = archs.dit_pixel()[1]
    ref = {}
    for n in (1, 2):  # (programs compute each step's own conditioning: so does the reference)
        apply(tiny_pipe, plan, batch_conditioning=False)
        with torch.no_grad():
            ref[n] = torch.as_tensor(np.asarray(call(tiny_pipe, n, 0, T)))
        remove(tiny_pipe)
    torch._dynamo.reset()
    backend = CountingBackend()
    apply(tiny_pipe, plan, compile={"backend": backend, "fullgraph": True})
    programs = tiny_pipe.transformer._diffusers_hook.get_hook("ditaccel.step").programs
    with torch.no_grad():
        got = {n: torch.as_tensor(np.asarray(call(tiny_pipe, n, 0, T))) for n in (1, 2)}
    for n in (1, 2):
        torch.testing.assert_close(got[n], ref[n], atol=ATOL, rtol=0)
    assert backend.graphs == len(programs.variants) == 4  # anchor and reuse, at two batch sizes
    state = state_of(tiny_pipe)
    state.step, state.branch = 1, 0  # a reusing step of the plan, with nothing cached
    program, weights = programs.program_for({})
    remove(tiny_pipe)
    assert plan.tokens[1].eq(REUSE).all() and not plan.anchors[1]
    assert all(a.tokens == FULL for row in program.modules for a in row) and program.reads == () and weights == []


def test_programs_can_keep_private_copies_of_what_they_store(tiny_pipe):
    """Where the programs are CUDA graphs, a replay overwrites the memory of the outputs the last
    replay of the same graph returned: the bank then holds copies (same images, no shared memory)."""
    shape = model_shape(tiny_pipe.transformer, T)
    plan = make_plan("fora", shape, interval=3, forecast=1)
    call = archs.dit_pixel()[1]
    assert CompileConfig(options={"mode": "reduce-overhead"}).copies and CompileConfig(options={"backend": "cudagraphs"}).copies
    assert not CompileConfig().copies
    images, outputs = {}, {}
    for copies in (False, True):
        torch._dynamo.reset()
        apply(tiny_pipe, plan, compile=CompileConfig(options={"backend": CountingBackend()}, copy_caches=copies))
        programs = tiny_pipe.transformer._diffusers_hook.get_hook("ditaccel.step").programs
        stored = []
        commit = programs._commit
        programs._commit = lambda bank, program, new: (stored.append(dict(new)), commit(bank, program, new))
        with torch.no_grad():
            images[copies] = torch.as_tensor(np.asarray(call(tiny_pipe, 1, 0, T)))
        banked = programs.banks[0]
        last = [new for new in stored if new][-1]  # the last anchor's outputs (they are still banked)
        outputs[copies] = all(banked[name].out is value for name, value in last.items())
        remove(tiny_pipe)
    assert torch.equal(images[True], images[False])
    assert outputs[False] and not outputs[True], "copies only where asked"


def test_a_plan_for_another_image_size_is_refused_in_a_program(tiny_pipe):
    """The token-count check runs while the program is traced: the same one-line PlanMismatch as
    the eager path, not a compiler error."""
    shape = model_shape(tiny_pipe.transformer, T)
    plan = make_plan("toca", dataclasses.replace(shape, num_tokens=shape.num_tokens * 4), interval=2, ratio=0.5)
    torch._dynamo.reset()
    apply(tiny_pipe, plan, compile={"backend": CountingBackend(), "fullgraph": True})
    try:
        with pytest.raises(PlanMismatch, match="make the plan for this image size"), torch.no_grad():
            archs.dit_pixel()[1](tiny_pipe, 1, 0, T)
    finally:
        remove(tiny_pipe)
