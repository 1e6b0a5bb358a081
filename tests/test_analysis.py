"""Bifurcation, exploration, sharpness and edge-of-stability analyses against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from dynscope.analysis.bifurcation import bifurcation_across_runs, bifurcation_in_time
from dynscope.analysis.exploration import effective_dimension, exploration, step_alignment
from dynscope.analysis.ground_truth import logistic_orbit
from dynscope.analysis.sharpness import curvature_reduction, sharpness
from dynscope.analysis.stability import edge_of_stability_lag, edge_of_stability_per_cycle


def test_bifurcation_in_time_branches() -> None:
    steps = np.arange(256)
    series = np.where(steps % 2 == 0, 1.0, -1.0) * (steps >= 128)
    diagram = bifurcation_in_time(series, steps, window=64)
    assert diagram["period"].values.tolist() == [1, 1, 2, 2]
    assert diagram["window_step"].values.tolist() == [32, 96, 160, 224]
    assert np.unique(diagram["value"].values[3]).tolist() == [-1.0, 1.0]


def test_bifurcation_in_time_units() -> None:
    diagram = bifurcation_in_time(np.zeros(64), np.arange(64), window=32)
    assert "long_name" in diagram["value"].attrs
    assert "units" in diagram["value"].attrs


def test_bifurcation_across_runs_logistic() -> None:
    r_values = [3.5, 2.9, 3.2]
    windows = [logistic_orbit(r, transient=4096, length=64) for r in r_values]
    diagram = bifurcation_across_runs(windows, r_values, "r")
    assert diagram["r"].values.tolist() == [2.9, 3.2, 3.5]
    assert diagram["period"].values.tolist() == [1, 2, 4]


def test_bifurcation_across_runs_rejects_lengths() -> None:
    with pytest.raises(ValueError, match="lengths"):
        bifurcation_across_runs([np.zeros(4), np.zeros(5)], [1.0, 2.0], "lr")


def test_exploration_straight_line() -> None:
    direction = np.array([3.0, 4.0])
    params = np.outer(np.arange(5.0), direction)
    measured = exploration(params, np.arange(5) * 10)
    assert measured.path_length == pytest.approx(20.0)
    assert measured.displacement == pytest.approx(20.0)
    assert measured.effective_dimension == pytest.approx(1.0)


def test_exploration_back_and_forth() -> None:
    params = np.array([[0.0], [1.0], [0.0], [1.0], [0.0]])
    measured = exploration(params, np.arange(5))
    assert measured.path_length == pytest.approx(4.0)
    assert measured.displacement == pytest.approx(0.0)


def test_exploration_per_cycle() -> None:
    params = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    measured = exploration(params, np.array([0, 5, 10, 15]), period=10)
    assert measured.cycles.tolist() == [0, 1]
    assert measured.path_length_per_cycle.tolist() == pytest.approx([1.0, 1.0])
    assert measured.displacement_per_cycle.tolist() == pytest.approx([1.0, 1.0])


def test_effective_dimension_isotropic_square() -> None:
    # The four corners of a square: two equal covariance eigenvalues, so dimension 2.
    params = np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])
    assert effective_dimension(params) == pytest.approx(2.0)


def test_effective_dimension_matches_covariance() -> None:
    rng = np.random.default_rng(0)
    params = rng.standard_normal((6, 40)) * np.linspace(1.0, 3.0, 40)
    eigenvalues = np.linalg.eigvalsh(np.cov(params, rowvar=False))
    expected = eigenvalues.sum() ** 2 / np.sum(eigenvalues**2)
    assert effective_dimension(params) == pytest.approx(expected, rel=1e-9)


def test_step_alignment_along_and_orthogonal() -> None:
    params = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 3.0], [3.0, 1.0, 3.0]])
    eigenvectors = np.array([[[1.0, 0.0, 0.0]]])
    alignment = step_alignment(params, np.arange(4), eigenvectors, np.array([0]))
    assert alignment.along.tolist() == pytest.approx([1.0, 0.0, 0.5])
    assert alignment.orthogonal.tolist() == pytest.approx([0.0, 1.0, 0.5])


def test_step_alignment_uses_latest_probe() -> None:
    params = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    eigenvectors = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    alignment = step_alignment(params, np.array([0, 10, 20]), eigenvectors, np.array([0, 10]))
    assert alignment.along.tolist() == pytest.approx([1.0, 0.0])


def test_sharpness_fraction_and_crossing() -> None:
    result = sharpness(np.array([0, 10, 20, 30]), np.array([1.0, 3.0, 5.0, 4.5]), lr=0.5)
    assert result.edge_final == pytest.approx(4.0)
    assert result.fraction_above_edge == pytest.approx(0.5)
    assert result.first_crossing_step == 20
    assert result.lambda_max_final == pytest.approx(4.5)


def test_sharpness_per_cycle() -> None:
    result = sharpness(np.array([0, 10, 20, 30]), np.array([1.0, 5.0, 3.0, 2.0]), lr=0.5, period=20)
    assert result.lambda_max_cycle_end.tolist() == [5.0, 2.0]
    assert result.fraction_above_edge_per_cycle.tolist() == [0.5, 0.0]


def test_sharpness_never_crossing() -> None:
    result = sharpness(np.array([0, 10]), np.array([1.0, 1.5]), lr=1.0)
    assert result.first_crossing_step is None


def test_curvature_reduction_pairs_static() -> None:
    runs = [
        {"name": "static", "loss": "ce", "amplitude": 1.0, "lr": 1.0, "lambda_max_final": 4.0},
        {"name": "dynamic", "loss": "dce", "amplitude": 70.0, "lr": 1.0, "lambda_max_final": 1.0},
        {"name": "other-lr", "loss": "dce", "amplitude": 70.0, "lr": 0.5, "lambda_max_final": 1.0},
    ]
    reductions = curvature_reduction(runs)
    assert len(reductions) == 1
    assert reductions[0].static == "static"
    assert reductions[0].ratio == pytest.approx(0.25)


def test_edge_of_stability_lag_steps() -> None:
    steps = np.arange(1000)
    track = np.where(steps < 600, 1, 2)
    result = edge_of_stability_lag(
        np.arange(0, 1000, 50), np.linspace(1.0, 3.0, 20), 2.0, track, steps
    )
    # lambda_max passes 2 between the probes at 450 (1.947) and 500 (2.053).
    assert result.crossing_step == 500
    assert result.period2_step == 600
    assert result.lag == 100


def test_edge_of_stability_uses_rise_before_onset() -> None:
    steps = np.arange(1000)
    track = np.where(steps < 700, 1, 2)
    probe_steps = np.arange(0, 1000, 50)
    # Sharp at initialisation, a brief early excursion, then the rise that leads into period 2.
    lambda_max = np.full(20, 1.0)
    lambda_max[0] = 3.0
    lambda_max[4] = 2.5
    lambda_max[13:] = 2.5
    result = edge_of_stability_lag(probe_steps, lambda_max, 2.0, track, steps)

    assert result.crossing_step == 650
    assert result.period2_step == 700
    assert result.lag == 50


def test_edge_of_stability_without_crossing() -> None:
    steps = np.arange(200)
    result = edge_of_stability_lag(
        np.array([0, 100]), np.array([1.0, 1.0]), 2.0, steps * 0 + 1, steps
    )
    assert result.lag is None


def test_edge_of_stability_per_cycle_lags() -> None:
    steps = np.arange(2000)
    track = np.where(steps % 1000 < 700, 1, 2)
    probe_steps = np.arange(0, 2000, 100)
    lambda_max = np.where(probe_steps % 1000 >= 500, 3.0, 1.0)
    results = edge_of_stability_per_cycle(probe_steps, lambda_max, 2.0, track, steps, 1000)
    assert [r.lag for r in results] == [200, 200]


def test_longest_stretch_near_edge() -> None:
    from dynscope.analysis.sharpness import longest_stretch_near_edge

    probe_steps = np.arange(0, 2000, 100)
    lambda_max = np.array(
        [1.0] * 5 + [1.9, 2.1, 2.0] + [3.0] + [1.85, 2.15, 1.95, 2.05, 2.0] + [1.0] * 6
    )
    stretch = longest_stretch_near_edge(probe_steps, lambda_max, 2.0, rtol=0.1)

    assert stretch is not None
    assert stretch.start_step == 900
    assert stretch.end_step == 1300
    assert stretch.probes == 5
    assert stretch.steps == 400


def test_longest_stretch_none_near_edge() -> None:
    from dynscope.analysis.sharpness import longest_stretch_near_edge

    assert longest_stretch_near_edge(np.arange(3), np.array([1.0, 5.0, 1.0]), 2.0) is None
