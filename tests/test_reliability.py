"""Artifact integrity under crashes, and what loading a file may and may not do."""

import json
import os
import random
import signal
import time
import warnings

import pytest
import torch

from ditaccel import io


def _versions(n=3, size=(256, 1024)):
    return [{"w": torch.full(size, float(i)), "i": torch.tensor([i])} for i in range(n)]


def test_header_metadata_is_the_artifact_and_the_json_a_copy(tmp_path):
    stem = tmp_path / "a"
    io.save_artifact(stem, "profile", {"w": torch.zeros(3)}, {"v": 1})
    _, header = io.read_tensors_and_metadata(tmp_path / "a.safetensors")
    assert json.loads(header[io.META_KEY]) == json.loads((tmp_path / "a.json").read_text())
    # a writer killed between the two renames: new tensors (with their metadata), old JSON copy
    io.save_artifact(stem, "profile", {"w": torch.ones(3)}, {"v": 2})
    (tmp_path / "a.json").write_text(json.dumps({"kind": "profile", "v": 1}))
    tensors, meta = io.load_artifact(stem, "profile")
    assert meta["v"] == 2 and torch.equal(tensors["w"], torch.ones(3))
    # the JSON copy alone (the tensors file lost) is not an artifact
    (tmp_path / "a.safetensors").unlink()
    with pytest.raises(io.ArtifactError, match="a.safetensors: file not found"):
        io.load_artifact(stem, "profile")


def test_old_style_artifacts_without_header_metadata_still_load_and_are_checked(tmp_path):
    stem = tmp_path / "old"
    t = {"w": torch.arange(4.0)}
    io.write_tensors(tmp_path / "old.safetensors", t)
    io.write_json(tmp_path / "old.json", {"schema_version": io.SCHEMA_VERSION, "kind": "plan",
                                          "tensors_sha256": io.tensors_digest(t)})
    assert torch.equal(io.load_artifact(stem, "plan")[0]["w"], t["w"])
    io.write_tensors(tmp_path / "old.safetensors", {"w": torch.zeros(4)})
    with pytest.raises(io.ArtifactError, match="do not match"):
        io.load_artifact(stem, "plan")


def test_sigkill_at_random_moments_never_leaves_a_broken_artifact(tmp_path):
    """A writer process is killed with SIGKILL 20 times while it rewrites an artifact over and
    over; after every kill the artifact loads intact (one whole version, tensors matching its
    metadata), and the temporary files a killed writer leaves are swept by the next write."""
    versions = _versions()
    stem = tmp_path / "ckpt"
    io.save_artifact(stem, "checkpoint", versions[0], {"v": 0})
    rng = random.Random(0)
    seen, mid_write = set(), 0
    for _ in range(20):
        r, w = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only writes files
            pid = os.fork()
        if pid == 0:  # the writer: no torch compute, only serialisation and file system calls
            os.close(r)
            try:
                for i in range(1, 10_000):
                    io.save_artifact(stem, "checkpoint", versions[i % 3], {"v": i % 3})
                    if i == 1:
                        os.write(w, b"1")
            finally:
                os._exit(0)
        os.close(w)
        os.read(r, 1)  # the writer has finished one whole write
        os.close(r)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_write += any(p.suffix == ".tmp" for p in tmp_path.iterdir())
        tensors, meta = io.load_artifact(stem, "checkpoint")
        v = meta["v"]
        assert torch.equal(tensors["w"], versions[v]["w"]) and int(tensors["i"]) == v
        seen.add(v)
    assert mid_write >= 1, "no kill landed inside a write: the test did not test anything"
    assert len(seen) >= 2
    io.save_artifact(stem, "checkpoint", versions[1], {"v": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.json", "ckpt.safetensors"]


def test_a_pickle_is_refused_where_an_artifact_is_expected(tmp_path):
    """torch.save writes a pickle; put where a safetensors artifact belongs it is refused, and
    the pickle's payload never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(2), "x": Payload()}, tmp_path / "p.safetensors")
    io.write_json(tmp_path / "p.json", {"schema_version": io.SCHEMA_VERSION, "kind": "profile"})
    with pytest.raises(io.ArtifactError, match="not a readable safetensors file"):
        io.load_artifact(tmp_path / "p", "profile")
    assert not marker.exists()


def test_a_pipeline_folder_with_pickled_weights_is_refused(tiny_pipe, tmp_path):
    from ditaccel.registry import ModelNotFound, load_pipeline

    marker = tmp_path / "pwned"
    folder = tmp_path / "pickled"
    tiny_pipe.save_pretrained(folder, safe_serialization=False)
    assert (folder / "transformer" / "diffusion_pytorch_model.bin").is_file()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = torch.load(folder / "transformer" / "diffusion_pytorch_model.bin", weights_only=True)
    torch.save({**state, "evil": Payload()}, folder / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelNotFound, match="pickled weights"):
        load_pipeline(str(folder))
    assert not marker.exists()


def _poison_partial_calls(module, num_tokens):
    """Make ``module`` return NaN whenever it runs on fewer tokens than the image has: what an
    accelerated step that recomputes a part of the tokens calls it with."""
    original = module.forward

    def poisoned(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        return out * float("nan") if x.shape[1] < num_tokens else out

    module.forward = poisoned


def test_nan_guard_names_the_step_and_layer_of_an_accelerated_step(tiny_pipe):
    from ditaccel.methods import make_plan, model_shape
    from ditaccel.runtime import apply, remove
    from ditaccel.runtime.state import NonFiniteOutput
    from ditaccel.sampling import sample

    shape = model_shape(tiny_pipe.transformer, 6)
    plan = make_plan("toca", shape, interval=3, ratio=0.5)
    _poison_partial_calls(tiny_pipe.transformer.transformer_blocks[1].ff, shape.num_tokens)
    apply(tiny_pipe, plan)
    with pytest.raises(NonFiniteOutput, match=r"sampling step 1 of 6: layer 1 \(mlp\)"):
        sample(tiny_pipe, [0, 1], steps=6, guidance_scale=2.0)
    # without the guard the pipeline returns the black (NaN) image the guard refuses, and sample,
    # which checks every batch's images, refuses it without naming the step
    apply(tiny_pipe, plan, nan_guard=False)
    images = tiny_pipe(class_labels=[0, 1], num_inference_steps=6, guidance_scale=2.0, output_type="pt",
                       generator=torch.Generator().manual_seed(0)).images
    assert not torch.isfinite(images).all()
    with pytest.raises(NonFiniteOutput, match="the images from image 0 on hold NaN or inf, computed by the plan"):
        sample(tiny_pipe, [0, 1], steps=6, guidance_scale=2.0)
    remove(tiny_pipe)


@pytest.mark.parametrize("collapse", [False, True])  # block by block, or collapsed reusing steps
def test_nan_guard_watches_forecasts_but_not_plain_reuse(tiny_pipe, monkeypatch, collapse):
    from ditaccel.methods import make_plan, model_shape
    from ditaccel.runtime import apply, remove, state_of
    from ditaccel.runtime.state import ModuleCache, NonFiniteOutput
    from ditaccel.sampling import sample

    shape = model_shape(tiny_pipe.transformer, 6)
    apply(tiny_pipe, make_plan("fora", shape, interval=3), collapse=collapse)
    sample(tiny_pipe, [0, 1], steps=6, guidance_scale=2.0)
    # reused outputs were computed on a full step, whose output was checked: nothing to watch
    assert state_of(tiny_pipe).finite_checks == []
    apply(tiny_pipe, make_plan("fora", shape, interval=3, forecast=1), collapse=collapse)
    sample(tiny_pipe, [0, 1], steps=6, guidance_scale=2.0)
    assert state_of(tiny_pipe).finite_checks, "a forecast is new values: watched"
    if collapse:  # the older of the two full outputs a collapsed step forecasts from
        real_store = ModuleCache.store

        def poisoned(self, *args, **kwargs):
            real_store(self, *args, **kwargs)
            if self.prev is not None:
                self.prev = self.prev * float("nan")

        monkeypatch.setattr(ModuleCache, "store", poisoned)
        where = "sampling step 4 of 6"  # the first forecast from two full outputs (steps 0, 3)
    else:
        real = ModuleCache.forecast
        monkeypatch.setattr(ModuleCache, "forecast", lambda self, step: real(self, step) * float("nan"))
        where = "sampling step 1 of 6"
    with pytest.raises(NonFiniteOutput, match=where + r": layer 0 \(attn\)"):
        sample(tiny_pipe, [0, 1], steps=6, guidance_scale=2.0)
    remove(tiny_pipe)


def test_nan_guard_blames_the_model_when_a_full_step_overflows(tiny_pipe):
    from ditaccel.methods import make_plan, model_shape
    from ditaccel.runtime import apply
    from ditaccel.runtime.state import NonFiniteOutput
    from ditaccel.sampling import sample

    plan = make_plan("fora", model_shape(tiny_pipe.transformer, 4), interval=2)
    with torch.no_grad():
        tiny_pipe.transformer.proj_out_2.bias.fill_(float("inf"))
    apply(tiny_pipe, plan)
    with pytest.raises(NonFiniteOutput, match="step 0 of 4: .*full-compute step .*not the plan"):
        sample(tiny_pipe, [0], steps=4, guidance_scale=1.0)


def test_an_interrupted_profile_resumes_to_the_uninterrupted_tables(tiny_pipe, tmp_path, monkeypatch):
    from ditaccel import profiling

    kw = dict(class_labels=[0, 1, 2, 3, 0], sampler="ddim", steps=6, guidance_scale=2.0, seed=7, batch_size=2,
              intervals=(1, 2), ratios=(0.25, 0.5), timing_repeats=1, progress=False)
    straight = profiling.profile(tiny_pipe, **kw)
    stem = tmp_path / "partial"
    real_save, saves = profiling._save_partial, []

    def save_then_die(*args):
        real_save(*args)
        saves.append(args[-1])
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed after the second batch was checkpointed

    monkeypatch.setattr(profiling, "_save_partial", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        profiling.profile(tiny_pipe, checkpoint=stem, **kw)
    assert saves == [2, 4]
    monkeypatch.setattr(profiling, "_save_partial", real_save)
    resumed = profiling.profile(tiny_pipe, checkpoint=stem, **kw)
    for name in ("e_cache", "e_cache_std", "e_prune"):
        a, b = getattr(straight, name), getattr(resumed, name)
        assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1)), name
    assert straight.module_flops.equal(resumed.module_flops)
    with pytest.raises(profiling.ProfileError, match=r"other settings \(seed\)"):
        profiling.profile(tiny_pipe, checkpoint=stem, **{**kw, "seed": 8})


def test_same_seed_same_plan_same_images_across_fresh_loads(tiny_pipe_dir, tmp_path):
    from ditaccel.methods import make_plan, model_shape
    from ditaccel.registry import load_pipeline
    from ditaccel.runtime import apply
    from ditaccel.sampling import sample

    runs = []
    for _ in range(2):
        pipe = load_pipeline(str(tiny_pipe_dir))
        plan = make_plan("toca", model_shape(pipe.transformer, 6), interval=3, ratio=0.5)
        plan.save(tmp_path / "plan.json")
        apply(pipe, type(plan).load(tmp_path / "plan.json"))
        runs.append(sample(pipe, [0, 1, 2], steps=6, guidance_scale=2.0, seed=3, batch_size=2)[0])
        runs.append(sample(pipe, [0, 1, 2], steps=6, guidance_scale=2.0, seed=3, batch_size=2)[0])
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    other = sample(pipe, [0, 1, 2], steps=6, guidance_scale=2.0, seed=4, batch_size=2)[0]
    assert not torch.equal(runs[0], other)


def test_tensors_that_share_memory_are_saved(tmp_path):
    e = torch.rand(3, 4)
    io.save_artifact(tmp_path / "s", "profile", {"a": e, "b": e[..., None], "c": e}, {})
    back, _ = io.load_artifact(tmp_path / "s", "profile")
    assert torch.equal(back["b"][..., 0], e) and torch.equal(back["c"], e)
