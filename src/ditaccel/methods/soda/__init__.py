"""SODA (Sensitivity-Oriented Dynamic Acceleration; CVPR 2026, arXiv 2603.07057).

- :mod:`.planner`: pure functions, a profile (``ditaccel.profiling``) and a budget -> a Plan.
- :mod:`.calibration`: the planner's candidates run on a few samples of your pipeline, the one
  closest to the full model kept (these functions run the pipeline).

Example::

    from ditaccel.methods import soda
    plan = soda.plan_soda(profile, speedup=2.5)                     # pure
    plan = soda.calibrate_soda(pipe, run, profile, speedup=2.5)     # measured on run(pipe)
"""

from .calibration import CRITERIA, CalibrationConfig, calibrate, calibrate_soda, scores
from .planner import (SPREADS, BudgetUnreachable, Config, ages_of, candidates, charged_flops, dp_schedule,
                      partial_pays, plan, plan_soda, predict, schedules, segment_costs, step_weights,
                      uniform_schedule)

__all__ = ["CRITERIA", "SPREADS", "BudgetUnreachable", "CalibrationConfig", "Config", "ages_of", "calibrate", "calibrate_soda", "candidates",
           "charged_flops", "dp_schedule", "partial_pays", "plan", "plan_soda", "predict", "schedules", "scores",
           "segment_costs", "step_weights", "uniform_schedule"]
