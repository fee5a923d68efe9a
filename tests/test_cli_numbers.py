"""Property test (hypothesis): every numeric option of ``generate``, ``plan`` and ``profile`` fed
finite, infinite, NaN, negative and huge values.  Whatever the value, the command ends without a
traceback: exit 0 with every JSON output strict and finite, or a one-line error and a non-zero
exit with nothing written."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditaccel.cli.main import main
from tests.test_bad_inputs import STEPS, world  # noqa: F401  (the module-scoped fixture)

EDGES = ["inf", "-inf", "nan", "NaN", "-1", "0", "1", "2", "0.5", "1.0000001", "-0.0", "1e-300", "1e300", "1e400",
         str(2 ** 62), str(2 ** 63), str(2 ** 70), str(-2 ** 70), "3.5", "07", "1_000", "0x10", ""]
# small values run quickly; huge ones must be refused before they run (or run as fast as small ones)
VALUES = st.one_of(st.sampled_from(EDGES), st.integers(-5, 12).map(str),
                   st.floats(allow_nan=True, allow_infinity=True, width=64).map(repr))


def _gen(w, t):
    return {"base": ["generate", "--model", str(w["pipe"]), "--steps", str(STEPS), "--classes", "0", "--n", "1",
                     "--dtype", "fp32", "--out", str(t / "g.png"), "--json", str(t / "s.json")],
            "outputs": ["g.png", "s.json"]}


GENERATE = {  # option -> extra arguments that make it take effect
    "--steps": [], "--cfg": [], "--n": [], "--seed": [], "--batch-size": [],
    "--interval": ["--method", "toca", "--ratio", "0.25"], "--ratio": ["--method", "toca", "--interval", "2"],
    "--cached-blocks": ["--method", "delta-dit", "--interval", "2"],
    "--boundary": ["--method", "delta-dit", "--interval", "2"], "--forecast": ["--method", "fora", "--interval", "2"],
}
# (calibration, on by default with a speedup budget, only where it is what is tested)
PLAN = {"--speedup": ["--calibrate", "0"], "--latency-speedup": ["--calibrate", "0"], "--anchors": [],
        "--spread": ["--speedup", "1.5", "--calibrate", "0"], "--lam": ["--speedup", "1.5", "--calibrate", "0"],
        "--rho-max": ["--speedup", "1.5", "--calibrate", "0"], "--calibrate": ["--speedup", "1.5"],
        "--calibrate-seed": ["--speedup", "1.5", "--calibrate", "2"]}
PROFILE = {"--steps": [], "--cfg": [], "--samples": [], "--seed": [], "--batch-size": [], "--intervals": [],
           "--ratios": []}


def _check(argv, outputs, t, capsys):
    for name in outputs:
        (t / name).unlink(missing_ok=True)
    capsys.readouterr()
    rc = main(argv)  # an exception here (a traceback at the command line) fails the test
    err = capsys.readouterr().err.strip()
    assert isinstance(rc, int)
    if rc == 0:
        for name in outputs:
            if name.endswith(".json") and (t / name).exists():
                json.loads((t / name).read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {name}: {argv}"))
        return
    # (a run that failed part way leaves its cleared progress bar before the line: "...\r")
    line = err.split("\r")[-1].strip()
    assert line.startswith(f"ditaccel {argv[0]}: error: ") and "\n" not in line and "Traceback" not in err, (argv, err)
    for name in outputs:
        assert not (t / name).exists(), f"{name} written by a failed run {argv}"


SETTINGS = settings(max_examples=45, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(option=st.sampled_from(sorted(GENERATE)), value=VALUES)
def test_generate_numbers(world, tmp_path_factory, capsys, option, value):
    t = tmp_path_factory.mktemp("gen")
    run = _gen(world, t)
    _check([*run["base"], *GENERATE[option], f"{option}={value}"], run["outputs"], t, capsys)


@SETTINGS
@given(option=st.sampled_from(sorted(PLAN)), value=VALUES)
def test_plan_numbers(world, tmp_path_factory, capsys, option, value):
    t = tmp_path_factory.mktemp("plan")
    argv = ["plan", "--profile", str(world["profile"]), "--model", str(world["pipe"]), "--out", str(t / "o.json"),
            *PLAN[option], f"{option}={value}"]
    _check(argv, ["o.json"], t, capsys)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(option=st.sampled_from(sorted(PROFILE)), value=VALUES)
def test_profile_numbers(world, tmp_path_factory, capsys, option, value):
    t = tmp_path_factory.mktemp("prof")
    extra = {"--steps": str(STEPS), "--samples": "2", "--cfg": "2", "--intervals": "1,2", "--ratios": "0.25,0.5",
             "--batch-size": "2"}
    extra.pop(option, None)
    argv = ["profile", "--model", str(world["pipe"]), "--dtype", "fp32", "--out", str(t / "p"),
            *[x for k, v in extra.items() for x in (k, v)], f"{option}={value}"]
    _check(argv, ["p.json", "p.safetensors"], t, capsys)
