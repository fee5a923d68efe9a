"""Options travel in config dataclasses (ProfileConfig, soda.CalibrationConfig, bench.MeasureConfig);
the older keyword form gives the same result with a DeprecationWarning naming the config to pass."""

import dataclasses
import warnings

import pytest
import torch

from ditaccel.bench import MeasureConfig, measure
from ditaccel.methods.soda import CalibrationConfig
from ditaccel.options import resolve
from ditaccel.profiling import ProfileConfig, profile


def test_resolve_takes_a_config_or_the_keyword_form_with_a_warning():
    assert resolve(ProfileConfig, None, {}, "profile") == ProfileConfig()
    given = ProfileConfig(steps=7)
    assert resolve(ProfileConfig, given, {}, "profile") is given
    with pytest.warns(DeprecationWarning, match=r"config=ProfileConfig\(steps=\.\.\.\)"):
        assert resolve(ProfileConfig, None, {"steps": 7}, "profile") == given
    with pytest.raises(TypeError, match="not both"):
        resolve(ProfileConfig, given, {"steps": 7}, "profile")
    with pytest.raises(TypeError, match="no option stepz"):
        resolve(ProfileConfig, None, {"stepz": 7}, "profile")
    with pytest.raises(TypeError, match="must be a ProfileConfig"):
        resolve(ProfileConfig, MeasureConfig(), {}, "profile")


def test_the_keyword_form_of_profile_gives_the_same_profile(tiny_pipe):
    opts = dict(class_labels=[0, 1], sampler="ddim", steps=4, guidance_scale=2.0, progress=False, timing_repeats=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config form warns about nothing
        new = profile(tiny_pipe, config=ProfileConfig(**opts))
    with pytest.warns(DeprecationWarning, match="profile"):
        old = profile(tiny_pipe, **opts)
    assert torch.equal(new.e_cache.nan_to_num(-1), old.e_cache.nan_to_num(-1))  # NaN: ages a step cannot have
    assert torch.equal(new.e_prune.nan_to_num(-1), old.e_prune.nan_to_num(-1))
    assert torch.equal(new.module_flops, old.module_flops)


def test_measure_and_calibration_take_their_configs(tiny_pipe):
    from ditaccel.sampling import sample

    run = lambda p: sample(p, [0, 1], steps=4, progress=False, count_flops=False)[0]  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = measure(tiny_pipe, run, run, [], MeasureConfig(repeats=0, progress=False))
    with pytest.warns(DeprecationWarning, match=r"MeasureConfig\(repeats=\.\.\., progress=\.\.\.\)"):
        old = measure(tiny_pipe, run, run, [], repeats=0, progress=False)
    assert new["rows"][0]["flops"] == old["rows"][0]["flops"]
    assert {f.name for f in dataclasses.fields(CalibrationConfig)} >= {"timed", "repeats", "progress", "fewer"}
