"""Bad input, CLI and Python API: one clear line that says what is wrong and how to fix it, exit
code 2 at the CLI, no traceback, and nothing written where the output was to go.

Each case builds its broken input from a small world (a tiny pipeline folder, its profile, a plan
for it, a second model) and names a phrase the message must contain."""

import json
import shutil

import pytest
import torch

from ditaccel import io
from ditaccel.cli.main import main
from tests.conftest import tiny_dit

STEPS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffusers import DDIMScheduler

    from ditaccel.models.reference import NOISE_SCHEDULE
    from ditaccel.pipeline import DiTPixelPipeline

    root = tmp_path_factory.mktemp("world")
    w = {"root": root}
    for name, seed in (("pipe", 0), ("other", 9)):
        pipe = DiTPixelPipeline(transformer=tiny_dit(seed=seed), scheduler=DDIMScheduler(**NOISE_SCHEDULE))
        pipe.save_pretrained(root / name, safe_serialization=True)
        w[name] = root / name
    assert main(["profile", "--model", str(w["pipe"]), "--steps", str(STEPS), "--samples", "2", "--cfg", "2",
                 "--intervals", "1,2", "--ratios", "0.25,0.5", "--dtype", "fp32",
                 "--out", str(root / "prof")]) == 0
    w["profile"] = root / "prof"
    assert main(["plan", "--profile", str(w["profile"]), "--speedup", "1.5", "--calibrate", "0",
                 "--out", str(root / "plan.json")]) == 0
    w["plan"] = root / "plan.json"
    return w


def _copy_profile(w, dst, edit_tensors=None, edit_meta=None):
    tensors, meta = io.load_artifact(w["profile"], "profile")
    meta = {k: v for k, v in meta.items() if k not in ("schema_version", "kind", "tensors_sha256")}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    io.save_artifact(dst, "profile", tensors, meta)
    return dst


def _bytes(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _profile_file(w, t, name, data):
    stem = t / name
    shutil.copy(w["profile"].with_suffix(".json"), t / f"{name}.json")
    _bytes(t / f"{name}.safetensors", data(w["profile"].with_name("prof.safetensors").read_bytes()))
    return stem


def _plan_cmd(stem, *extra):
    return ["plan", "--profile", str(stem), "--speedup", "1.5", *extra]


def _gen(w, t, *extra, model="pipe", steps=STEPS):
    return ["generate", "--model", str(w[model]), "--steps", str(steps), "--classes", "0", "--n", "1",
            "--dtype", "fp32", *extra]


def _nan_measured(t):
    t["e_cache"][3, 0, 0, 0] = float("nan")


def _inf_prune(t):
    t["e_prune"][2, 1, 0, 0, 0, 0] = float("inf")


def _old_schema_profile(w, t):
    stem = _copy_profile(w, t / "p")
    tensors, header = io.read_tensors_and_metadata(t / "p.safetensors")
    meta = json.loads(header[io.META_KEY])
    meta["schema_version"] = 0
    io.write_tensors(t / "p.safetensors", tensors, {io.META_KEY: json.dumps(meta)})
    return stem


def _fake_shiva(t, fingerprint="0" * 16):
    io.save_artifact(t / "shiva", "shiva", {"ratio_table": torch.ones(STEPS, 2)},
                     {"fingerprint": fingerprint, "router": {}, "num_layers": 2})
    return t / "shiva"


def _plan_json(w, t, edit):
    doc = json.loads(w["plan"].read_text())
    edit(doc)
    p = t / "bad-plan.json"
    p.write_text(json.dumps(doc))
    return p


def _unet_folder(t):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(t / "unet", safe_serialization=True)
    return t / "unet"


def _pickled_folder(w, t):
    from ditaccel.registry import load_pipeline

    folder = t / "pickled"
    load_pipeline(str(w["pipe"])).save_pretrained(folder, safe_serialization=False)
    return folder


def _no_weights_folder(w, t):
    folder = t / "noweights"
    shutil.copytree(w["pipe"], folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    return folder


def _garbage_index(w, t):
    folder = t / "garbage-index"
    shutil.copytree(w["pipe"], folder)
    (folder / "model_index.json").write_text("{\"_class_name\": ")
    return folder


def _dir_with_config(t):
    _bytes(t / "transformer-only" / "config.json", b'{"_class_name": "DiTTransformer2DModel"}')
    return t / "transformer-only"


def _a_file(t):
    return _bytes(t / "afile", b"x")


def _set_token(d, value):
    d["tokens"][-1][0][0] = value


def _sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)  # as large as a huge file to stat, without writing it
    return path


def _not_a_png(t):
    for side in ("ref", "test"):
        (t / side).mkdir()
        (t / side / "a.png").write_text("this is text, not an image")
    return t


def _truncated_partial(w, t):
    stem = t / "p.partial"
    _copy_profile(w, stem)
    data = (t / "p.partial.safetensors").read_bytes()
    (t / "p.partial.safetensors").write_bytes(data[: len(data) // 3])
    return t / "p"


HUGE_INT = str(2 ** 70)

# (id, argv builder (world, tmp_path) -> argv, phrase the one-line message must contain, output path)
CASES = [
    # non-finite, negative and huge numbers (the options are read and checked by argparse, which names them)
    ("cfg-inf", lambda w, t: _gen(w, t, "--cfg", "inf", "--out", str(t / "g.png")), "--cfg: must be a finite number >= 1", "g.png"),
    ("cfg-nan", lambda w, t: _gen(w, t, "--cfg", "nan", "--out", str(t / "g.png")), "--cfg: must be a finite number >= 1", "g.png"),
    ("cfg-negative", lambda w, t: _gen(w, t, "--cfg", "-2", "--out", str(t / "g.png")), "--cfg: must be a finite number >= 1", "g.png"),
    ("speedup-nan", lambda w, t: _plan_cmd(w["profile"], "--out", str(t / "o.json"))[:4] + ["nan", "--out", str(t / "o.json")],
     "--speedup: must be a finite number > 1, got 'nan'", "o.json"),
    ("latency-speedup-nan", lambda w, t: ["plan", "--profile", str(w["profile"]), "--latency-speedup", "nan", "--out", str(t / "o.json")],
     "--latency-speedup: must be a finite number > 1", "o.json"),
    ("lam-nan", lambda w, t: _plan_cmd(w["profile"], "--lam", "nan", "--out", str(t / "o.json")), "--lam: must be a finite number >= 0", "o.json"),
    ("seed-huge", lambda w, t: _gen(w, t, "--seed", HUGE_INT, "--out", str(t / "g.png")), "--seed: must be an integer in [0, 2**63)", "g.png"),
    ("seed-negative", lambda w, t: _gen(w, t, "--seed", "-1", "--out", str(t / "g.png")), "--seed: must be an integer in [0, 2**63)", "g.png"),
    ("n-huge", lambda w, t: _gen(w, t, "--n", str(10 ** 12), "--out", str(t / "g.png")), "would need about", "g.png"),
    ("steps-huge", lambda w, t: _gen(w, t, "--out", str(t / "g.png"), steps=5000), "more than the scheduler's 1000 training timesteps", "g.png"),
    ("profile-samples-huge", lambda w, t: ["profile", "--model", str(w["pipe"]), "--samples", str(10 ** 15), "--out", str(t / "p")],
     "--samples 1000000000000000 would need about", "p.json"),
    ("profile-intervals-inf", lambda w, t: ["profile", "--model", str(w["pipe"]), "--intervals", "1,inf", "--out", str(t / "p")],
     "--intervals must be finite numbers", "p.json"),
    ("profile-steps-huge-int", lambda w, t: ["profile", "--model", str(w["pipe"]), "--steps", HUGE_INT, "--out", str(t / "p")],
     "--steps: must be an integer >= 1", "p.json"),
    ("profile-steps-huge", lambda w, t: ["profile", "--model", str(w["pipe"]), "--steps", str(2 ** 62), "--out", str(t / "p")],
     "more than the scheduler's 1000 training timesteps", "p.json"),
    ("plan-calibrate-negative", lambda w, t: _plan_cmd(w["profile"], "--calibrate", "-3", "--out", str(t / "o.json")),
     "--calibrate: must be an integer >= 0", "o.json"),
    # one output path given twice
    ("out-and-json-same-file", lambda w, t: _gen(w, t, "--out", str(t / "g.png"), "--json", str(t / "g.png")),
     "--out and --json both name", "g.png"),
    # plan files that would have been read wrongly
    ("plan-fractional-tokens", lambda w, t: _gen(w, t, "--plan", str(_plan_json(w, t, lambda d: _set_token(d, 20.5))), "--out", str(t / "g.png")),
     "must hold integers, found 20.5", "g.png"),
    ("plan-without-meta", lambda w, t: _gen(w, t, "--plan", str(_plan_json(w, t, lambda d: d.pop("meta"))), "--out", str(t / "g.png")),
     "missing the field 'meta'", "g.png"),
    ("plan-without-fingerprint", lambda w, t: _gen(w, t, "--plan", str(_plan_json(w, t, lambda d: d["meta"].pop("fingerprint"))),
                                                   "--out", str(t / "g.png")), "missing the model fingerprint", "g.png"),
    ("plan-nan-token", lambda w, t: _gen(w, t, "--plan", str(_bytes(t / "p.json", w["plan"].read_bytes().replace(b"-1", b"NaN", 1))),
                                         "--out", str(t / "g.png")), "NaN is not a JSON number", "g.png"),
    ("plan-huge-file", lambda w, t: _gen(w, t, "--plan", str(_sparse(t / "p.json", 200 * 2 ** 20)), "--out", str(t / "g.png")),
     "too large for a ditaccel JSON file", "g.png"),
    ("plan-nested-deep", lambda w, t: _gen(w, t, "--plan", str(_bytes(t / "p.json", b"[" * 200_000 + b"]" * 200_000)),
                                           "--out", str(t / "g.png")), "nested too deeply", "g.png"),
    # inputs that are not what their name says
    ("metrics-text-named-png", lambda w, t: ["metrics", "--ref", str(_not_a_png(t) / "ref"), "--test", str(t / "test"),
                                             "--json", str(t / "m.json")], "not a readable image", "m.json"),
    ("profile-partial-truncated", lambda w, t: ["profile", "--model", str(w["pipe"]), "--steps", str(STEPS), "--samples", "2",
                                                "--cfg", "2", "--intervals", "1,2", "--ratios", "0.25,0.5", "--dtype", "fp32",
                                                "--out", str(_truncated_partial(w, t))],
     "--restart", "p.json"),
    # damaged artifacts
    ("profile-truncated", lambda w, t: _plan_cmd(_profile_file(w, t, "p", lambda b: b[: len(b) // 2]), "--out", str(t / "o.json")),
     "not a readable safetensors file", "o.json"),
    ("profile-empty", lambda w, t: _plan_cmd(_profile_file(w, t, "p", lambda b: b""), "--out", str(t / "o.json")),
     "not a readable safetensors file", "o.json"),
    ("profile-garbage", lambda w, t: _plan_cmd(_profile_file(w, t, "p", lambda b: b"\x07garbage" * 50), "--out", str(t / "o.json")),
     "not a readable safetensors file", "o.json"),
    ("profile-flipped-bytes", lambda w, t: _plan_cmd(_profile_file(w, t, "p", lambda b: b[:-64] + bytes(64)), "--out", str(t / "o.json")),
     "do not match", "o.json"),
    ("profile-nan", lambda w, t: _plan_cmd(_copy_profile(w, t / "p", _nan_measured), "--out", str(t / "o.json")),
     "NaN where a cache error was measured", "o.json"),
    ("profile-inf", lambda w, t: _plan_cmd(_copy_profile(w, t / "p", _inf_prune), "--out", str(t / "o.json")),
     "e_prune has infinite or negative values", "o.json"),
    ("profile-schema", lambda w, t: _plan_cmd(_old_schema_profile(w, t), "--out", str(t / "o.json")),
     "schema version 0 is not", "o.json"),
    ("profile-wrong-kind", lambda w, t: _plan_cmd(_fake_shiva(t), "--out", str(t / "o.json")),
     "not a profile artifact", "o.json"),
    ("profile-missing", lambda w, t: _plan_cmd(t / "nowhere", "--out", str(t / "o.json")),
     "no profile at", "o.json"),
    ("profile-other-model", lambda w, t: _plan_cmd(w["profile"], "--model", str(w["other"]), "--out", str(t / "o.json")),
     "another model", "o.json"),
    ("plan-garbage", lambda w, t: _gen(w, t, "--plan", str(_bytes(t / "p.json", b"{not json")), "--out", str(t / "g.png")),
     "not valid JSON", "g.png"),
    ("plan-truncated", lambda w, t: _gen(w, t, "--plan", str(_bytes(t / "p.json", w["plan"].read_bytes()[:40])), "--out", str(t / "g.png")),
     "not valid JSON", "g.png"),
    ("plan-wrong-kind", lambda w, t: _gen(w, t, "--plan", str(_plan_json(w, t, lambda d: d.update(kind="profile"))), "--out", str(t / "g.png")),
     "not a ditaccel plan", "g.png"),
    ("plan-missing-field", lambda w, t: _gen(w, t, "--plan", str(_plan_json(w, t, lambda d: d.pop("anchors"))), "--out", str(t / "g.png")),
     "missing the field 'anchors'", "g.png"),
    ("plan-schema", lambda w, t: _gen(w, t, "--plan", str(_plan_json(w, t, lambda d: d.update(schema_version=7))), "--out", str(t / "g.png")),
     "plan schema version 7", "g.png"),
    ("plan-missing", lambda w, t: _gen(w, t, "--plan", str(t / "nowhere.json"), "--out", str(t / "g.png")),
     "file not found", "g.png"),
    # an artifact for another model, sampler or step count
    ("plan-other-model", lambda w, t: _gen(w, t, "--plan", str(w["plan"]), "--out", str(t / "g.png"), model="other"),
     "another model", "g.png"),
    ("plan-other-sampler", lambda w, t: _gen(w, t, "--plan", str(w["plan"]), "--sampler", "dpm++", "--out", str(t / "g.png")),
     "made for the ddim sampler", "g.png"),
    ("plan-other-steps", lambda w, t: _gen(w, t, "--plan", str(w["plan"]), "--out", str(t / "g.png"), steps=9),
     "steps", "g.png"),
    # --dtype fp32 as the profile was made: under auto, a bf16-native CPU loads bf16 weights, whose
    # fingerprint is another model's and would be refused first
    ("profile-other-sampler", lambda w, t: ["bench", "--model", str(w["pipe"]), "--dtype", "fp32", "--profile", str(w["profile"]), "--sampler", "dpm++",
                                            "--steps", str(STEPS), "--n", "2", "--methods", "soda", "--out", str(t / "b")],
     "made with the ddim sampler", "b"),
    ("profile-other-steps", lambda w, t: ["bench", "--model", str(w["pipe"]), "--dtype", "fp32", "--profile", str(w["profile"]),
                                          "--steps", "9", "--n", "2", "--methods", "soda", "--out", str(t / "b")],
     "for 6 sampling steps", "b"),
    ("shiva-other-model", lambda w, t: _gen(w, t, "--shiva", str(_fake_shiva(t)), "--out", str(t / "g.png")),
     "trained for another model", "g.png"),
    ("shiva-truncated", lambda w, t: _gen(w, t, "--shiva", str(_profile_file(w, t, "shiva", lambda b: b[:100])), "--out", str(t / "g.png")),
     "not a readable safetensors file", "g.png"),
    ("shiva-missing", lambda w, t: _gen(w, t, "--shiva", str(t / "nowhere"), "--out", str(t / "g.png")),
     "no artifact here", "g.png"),
    # impossible budgets
    ("speedup-1", lambda w, t: ["plan", "--profile", str(w["profile"]), "--speedup", "1", "--out", str(t / "o.json")],
     "--speedup: must be a finite number > 1", "o.json"),
    ("latency-speedup-below-1", lambda w, t: ["plan", "--profile", str(w["profile"]), "--latency-speedup", "0.8", "--out", str(t / "o.json")],
     "> 1", "o.json"),
    ("anchors-more-than-steps", lambda w, t: ["plan", "--profile", str(w["profile"]), "--anchors", "99", "--out", str(t / "o.json")],
     "anchors must be at most the profile's 6 sampling steps", "o.json"),
    ("anchors-zero", lambda w, t: ["plan", "--profile", str(w["profile"]), "--anchors", "0", "--out", str(t / "o.json")],
     "anchors", "o.json"),
    ("toca-ratio-negative", lambda w, t: _gen(w, t, "--method", "toca", "--interval", "2", "--ratio", "-0.1", "--out", str(t / "g.png")),
     "in [0, 1)", "g.png"),
    ("toca-ratio-above-1", lambda w, t: _gen(w, t, "--method", "toca", "--interval", "2", "--ratio", "1.5", "--out", str(t / "g.png")),
     "in [0, 1)", "g.png"),
    ("shiva-keep-0", lambda w, t: ["train-shiva", "--keep", "0", "--out", str(t / "s")], "keep must be in (0, 1)", "s.json"),
    ("shiva-keep-above-1", lambda w, t: ["train-shiva", "--keep", "1.5", "--out", str(t / "s")], "keep must be in (0, 1)", "s.json"),
    ("profile-ratio-above-1", lambda w, t: ["profile", "--model", str(w["pipe"]), "--ratios", "0.5,1.5", "--out", str(t / "p")],
     "(0, 1)", "p.json"),
    ("profile-interval-0", lambda w, t: ["profile", "--model", str(w["pipe"]), "--intervals", "0,1", "--out", str(t / "p")],
     ">= 1", "p.json"),
    ("profile-interval-fraction", lambda w, t: ["profile", "--model", str(w["pipe"]), "--intervals", "1,2.5", "--out", str(t / "p")],
     "whole steps", "p.json"),
    # models ditaccel cannot run
    ("unsupported-blocks", lambda w, t: ["profile", "--model", str(_unet_folder(t)), "--steps", "3", "--out", str(t / "p")],
     "UNet2DModel", "p.json"),
    ("shiva-image-size", lambda w, t: ["train-shiva", "--model", str(w["pipe"]), "--out", str(t / "s")],
     "28x28x1", "s.json"),
    ("not-a-pipeline-folder", lambda w, t: ["generate", "--model", str(_dir_with_config(t)), "--out", str(t / "g.png")],
     "not a diffusers pipeline folder", "g.png"),
    ("model-index-garbage", lambda w, t: ["generate", "--model", str(_garbage_index(w, t)), "--out", str(t / "g.png")],
     "model_index.json is not valid JSON", "g.png"),
    ("model-without-weights", lambda w, t: ["generate", "--model", str(_no_weights_folder(w, t)), "--out", str(t / "g.png")],
     "diffusers could not load it", "g.png"),
    ("model-pickled-weights", lambda w, t: ["generate", "--model", str(_pickled_folder(w, t)), "--out", str(t / "g.png")],
     "pickled weights", "g.png"),
    ("model-missing", lambda w, t: ["generate", "--model", str(t / "nope"), "--out", str(t / "g.png")],
     "neither a bundled model", "g.png"),
    # mismatched batch and options
    ("batch-size-0", lambda w, t: _gen(w, t, "--batch-size", "0", "--out", str(t / "g.png")), "--batch-size: must be an integer >= 1", "g.png"),
    ("bench-n-0", lambda w, t: ["bench", "--model", str(w["pipe"]), "--n", "0", "--out", str(t / "b")], "--n", "b"),
    ("bench-unknown-method", lambda w, t: ["bench", "--model", str(w["pipe"]), "--methods", "magic", "--out", str(t / "b")],
     "magic", "b"),
    ("prompt-on-class-model", lambda w, t: _gen(w, t, "--prompt", "a coat", "--out", str(t / "g.png")),
     "class-conditional", "g.png"),
    ("text-train-batch-0", lambda w, t: ["train-text-reference", "--preset", "fmnist-pixart", "--batch-size", "0",
                                         "--out", str(t / "r")], "batch_size must be >= 1", "r"),
    # devices this machine does not have (cuda:99: no machine has 100 GPUs)
    ("device-missing-gpu", lambda w, t: _gen(w, t, "--device", "cuda:99", "--out", str(t / "g.png")),
     "--device cuda:99: ", "g.png"),
    ("device-unsupported", lambda w, t: _gen(w, t, "--device", "mps", "--out", str(t / "g.png")),
     "runs on the CPU or on CUDA", "g.png"),
    ("device-garbage", lambda w, t: ["profile", "--model", str(w["pipe"]), "--device", "gpu!", "--out", str(t / "p")],
     "is not a device", "p.json"),
    ("device-train-shiva", lambda w, t: ["train-shiva", "--model", str(w["pipe"]), "--device", "cuda:99",
                                         "--out", str(t / "s")], "--device cuda:99: ", "s"),
    # outputs that cannot be written
    ("out-under-a-file", lambda w, t: _gen(w, t, "--out", str(_a_file(t) / "g.png")), "cannot write", "afile/g.png"),
    ("profile-out-unwritable", lambda w, t: ["profile", "--model", str(w["pipe"]), "--steps", "3", "--samples", "1",
                                             "--out", "/proc/ditaccel-test/p"], "cannot write", "p.json"),
    ("plan-out-under-a-file", lambda w, t: ["plan", "--profile", str(w["profile"]), "--speedup", "1.5",
                                            "--out", str(_a_file(t) / "o.json")], "cannot write", "afile/o.json"),
    ("json-out-under-a-file", lambda w, t: _gen(w, t, "--out", str(t / "g.png"), "--json", str(_a_file(t) / "s.json")),
     "cannot write", "g.png"),
]


@pytest.mark.parametrize("build,needle,output", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_bad_input(world, tmp_path, capsys, build, needle, output):
    argv = build(world, tmp_path)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith(f"ditaccel {argv[0]}: error: "), err
    assert needle in err, err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / output).exists(), f"{output} was written"
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_the_suite_is_broad():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


# -- the Python API: the same errors, as exceptions of ours (ValueError subclasses) with one line

def _api_cases():
    from ditaccel.methods import make_plan, model_shape, soda
    from ditaccel.methods.shiva.inference import budget_shift, load_shiva
    from ditaccel.plan import Plan
    from ditaccel.profiling import Profile, profile
    from ditaccel.registry import load_pipeline
    from ditaccel.runtime import apply
    from ditaccel.sampling import sample

    def other_model_plan(w, t):
        pipe = load_pipeline(str(w["other"]))
        apply(pipe, Plan.load(w["plan"]))

    def other_layers(w, t):
        from dataclasses import replace

        plan = make_plan("fora", replace(model_shape(tiny_dit(), STEPS), num_layers=3), interval=2)
        apply(load_pipeline(str(w["pipe"])), plan)

    def ddpm_pipe():
        from diffusers import DDPMPipeline

        return DDPMPipeline.from_pretrained(_unet_folder(t_dir[0]))

    t_dir = [None]

    def swapped_scheduler(w, t):
        from diffusers import DDPMScheduler

        pipe = load_pipeline(str(w["pipe"]))
        apply(pipe, Plan.load(w["plan"]))  # a SODA plan for the ddim sampler
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        pipe(class_labels=[0], num_inference_steps=STEPS, guidance_scale=2.0)

    def with_dir(f):
        def run(w, t):
            t_dir[0] = t
            return f(w, t)
        return run

    return [
        ("apply-not-a-plan", lambda w, t: apply(load_pipeline(str(w["pipe"])), 42), TypeError, "path of a plan JSON"),
        ("apply-unet-pipeline", with_dir(lambda w, t: apply(ddpm_pipe(), Plan.load(w["plan"]))), ValueError,
         "DDPMPipeline has no transformer to accelerate (it has unet: UNet2DModel"),
        ("profile-unet-pipeline", with_dir(lambda w, t: profile(ddpm_pipe(), class_labels=[0], steps=2)), ValueError,
         "DDPMPipeline has no transformer"),
        ("apply-swapped-scheduler", swapped_scheduler, ValueError, "made for the ddim sampler (DDIMScheduler) but"),
        ("soda-lam-nan", lambda w, t: soda.plan_soda(Profile.load(w["profile"]), speedup=2, lam=float("nan")), ValueError,
         "0 <= lam < inf"),
        ("sample-cfg-inf", lambda w, t: sample(load_pipeline(str(w["pipe"])), [0], steps=2, guidance_scale=float("inf")),
         ValueError, "guidance scale must be a finite number"),
        ("plan-load-garbage", lambda w, t: Plan.load(_bytes(t / "p.json", b"[1, 2")), io.ArtifactError, "not valid JSON"),
        ("plan-speedup-below-1", lambda w, t: soda.plan_soda(Profile.load(w["profile"]), speedup=0.5), ValueError, "must be a finite number > 1"),
        ("profile-load-nan", lambda w, t: Profile.load(_copy_profile(w, t / "p", _nan_measured)), ValueError, "NaN"),
        ("apply-other-model", other_model_plan, ValueError, "another model"),
        ("apply-other-layers", other_layers, ValueError, "blocks"),
        ("shiva-other-model", lambda w, t: load_shiva(_fake_shiva(t), tiny_dit()), io.ArtifactError, "another model"),
        ("sample-steps-0", lambda w, t: sample(load_pipeline(str(w["pipe"])), [0], steps=0), ValueError, "steps must be >= 1"),
        ("sample-class-out-of-range", lambda w, t: sample(load_pipeline(str(w["pipe"])), [99], steps=2), ValueError, "99"),
        ("profile-bad-ratio", lambda w, t: profile(load_pipeline(str(w["pipe"])), class_labels=[0], steps=2, ratios=(1.5,)),
         ValueError, "(0, 1)"),
        ("load-missing-model", lambda w, t: load_pipeline(str(t / "nope")), ValueError, "neither a bundled model"),
        ("shiva-budget-0", lambda w, t: budget_shift(torch.ones(2, 2) * 0.5, 0.0), ValueError, "(0, 1]"),
        ("unknown-method", lambda w, t: make_plan("magic", model_shape(tiny_dit(), STEPS)), ValueError, "unknown method"),
    ]


API_IDS = ["apply-not-a-plan", "apply-unet-pipeline", "profile-unet-pipeline", "apply-swapped-scheduler", "soda-lam-nan",
           "sample-cfg-inf", "plan-load-garbage", "plan-speedup-below-1", "profile-load-nan", "apply-other-model", "apply-other-layers",
           "shiva-other-model", "sample-steps-0", "sample-class-out-of-range", "profile-bad-ratio", "load-missing-model",
           "shiva-budget-0", "unknown-method"]


@pytest.mark.parametrize("case", API_IDS)
def test_api_bad_input(world, tmp_path, case):
    cases = {c[0]: c[1:] for c in _api_cases()}
    build, exc, needle = cases[case]
    with pytest.raises(exc) as info:
        build(world, tmp_path)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


def test_api_apply_takes_a_plan_path_or_dict(world):
    from ditaccel.plan import Plan
    from ditaccel.registry import load_pipeline
    from ditaccel.runtime import apply, remove, state_of

    pipe = load_pipeline(str(world["pipe"]))
    for given in (world["plan"], str(world["plan"]), json.loads(world["plan"].read_text())):
        apply(pipe, given)
        assert state_of(pipe).plan == Plan.load(world["plan"])
        remove(pipe)


def test_a_profile_or_plan_made_in_fp32_runs_in_bf16(world, tmp_path, capsys):
    # the README's flow with --dtype auto on a bf16-native CPU: same weights, another precision
    argv = _gen(world, tmp_path, "--plan", str(world["plan"]), "--out", str(tmp_path / "g.png"))
    argv[argv.index("fp32")] = "bf16"
    assert main(argv) == 0, capsys.readouterr().err
    assert main(["plan", "--profile", str(world["profile"]), "--speedup", "1.5", "--model", str(world["pipe"]),
                 "--calibrate", "0", "--out", str(tmp_path / "o.json")]) == 0


def _nan_weights_folder(w, t):
    from ditaccel.registry import load_pipeline

    pipe = load_pipeline(str(w["pipe"]))
    with torch.no_grad():
        pipe.transformer.proj_out_2.weight[0, 0] = float("nan")
    pipe.save_pretrained(t / "nan-model", safe_serialization=True)
    return t / "nan-model"


def test_nan_weights_without_a_plan_fail_loudly(world, tmp_path, capsys):
    """No plan runs (so no NaN guard in the runtime): the images are checked all the same."""
    folder = _nan_weights_folder(world, tmp_path)
    argv = ["generate", "--model", str(folder), "--steps", "3", "--classes", "0", "--n", "1", "--dtype", "fp32",
            "--out", str(tmp_path / "g.png"), "--json", str(tmp_path / "s.json")]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "weights are not finite (proj_out_2.weight)" in err and "\n" not in err, err
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "s.json").exists()


def test_json_outputs_are_strict(tmp_path):
    io.write_json(tmp_path / "a.json", {"psnr": float("inf"), "x": [float("nan"), 1.5], "n": 3})
    text = (tmp_path / "a.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in strict JSON")) == {
        "psnr": None, "x": [None, 1.5], "n": 3}
