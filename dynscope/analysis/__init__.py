"""Analyses of training records: periods, bifurcations, exploration, curvature, ground truths.

Each module takes numpy arrays or xarray objects; `report` reads records through
`dynscope.store` and composes the analyses and figures for the command line.
"""

from dynscope.analysis.bifurcation import bifurcation_across_runs, bifurcation_in_time
from dynscope.analysis.exploration import (
    Exploration,
    StepAlignment,
    effective_dimension,
    exploration,
    step_alignment,
)
from dynscope.analysis.ground_truth import (
    double_well_orbit,
    feigenbaum_ratios,
    find_period_doubling,
    logistic_orbit,
    period_doubling_points,
    quadratic_orbit,
    run_ground_truth,
)
from dynscope.analysis.periods import (
    CycleCascade,
    PeriodDoubling,
    cascades_by_cycle,
    detect_period,
    doubling_cascades,
    period_doubling_events,
    period_track,
)
from dynscope.analysis.report import analyze_record, analyze_runs, format_summary
from dynscope.analysis.sharpness import (
    CurvatureReduction,
    Sharpness,
    curvature_reduction,
    sharpness,
)
from dynscope.analysis.stability import (
    EdgeOfStability,
    edge_of_stability_lag,
    edge_of_stability_per_cycle,
)

__all__ = [
    "CurvatureReduction",
    "CycleCascade",
    "EdgeOfStability",
    "Exploration",
    "PeriodDoubling",
    "Sharpness",
    "StepAlignment",
    "analyze_record",
    "analyze_runs",
    "bifurcation_across_runs",
    "bifurcation_in_time",
    "cascades_by_cycle",
    "curvature_reduction",
    "detect_period",
    "double_well_orbit",
    "doubling_cascades",
    "edge_of_stability_lag",
    "edge_of_stability_per_cycle",
    "effective_dimension",
    "exploration",
    "feigenbaum_ratios",
    "find_period_doubling",
    "format_summary",
    "logistic_orbit",
    "period_doubling_events",
    "period_doubling_points",
    "period_track",
    "quadratic_orbit",
    "run_ground_truth",
    "sharpness",
    "step_alignment",
]
