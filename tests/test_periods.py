"""Period detection against known cascades: the logistic map and GD on the double well."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import fsolve

from dynscope.analysis import ground_truth
from dynscope.analysis.periods import (
    PeriodDoubling,
    cascades_by_cycle,
    detect_period,
    doubling_cascades,
    period_doubling_events,
    period_track,
)

NOISE = 1e-6  # relative Gaussian noise added to the series in the noisy cases

LOGISTIC_CASES = [
    (2.9, 1),
    (3.0 - 1e-3, 1),
    (3.05, 2),
    (3.2, 2),
    (3.44, 2),
    (3.46, 4),
    (3.5, 4),
    (3.54, 4),
    (3.548, 8),
    (3.56, 8),
    (3.563, 8),
    (3.7, 0),
    (3.9, 0),
]


def _with_noise(orbit: np.ndarray, relative: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return orbit + relative * np.abs(orbit) * rng.standard_normal(orbit.shape)


@pytest.mark.parametrize("relative_noise", [0.0, NOISE])
@pytest.mark.parametrize(("r", "expected"), LOGISTIC_CASES)
def test_logistic_period_at_r(r: float, expected: int, relative_noise: float) -> None:
    orbit = _with_noise(ground_truth.logistic_orbit(r), relative_noise)
    assert detect_period(orbit) == expected


def test_period_of_constant_window() -> None:
    assert detect_period(np.full(16, 0.25)) == 1


def test_period_of_zero_window() -> None:
    assert detect_period(np.zeros(16)) == 1


def test_period_of_window_with_nan() -> None:
    window = np.tile([1.0, 2.0], 8)
    window[3] = np.nan
    assert detect_period(window) == 0


def test_period_needs_two_repeats() -> None:
    # Three entries of a period-3 pattern do not show that it repeats.
    assert detect_period(np.array([1.0, 2.0, 5.0, 1.0, 2.0])) == 0


def test_period_with_linear_drift() -> None:
    steps = np.arange(64)
    window = 1e-3 * steps + np.tile([0.1, -0.1, 0.05, -0.1], 16)
    assert detect_period(window) == 4


def test_period_without_detrend_rejects_drift() -> None:
    steps = np.arange(64)
    window = 1e-3 * steps + np.tile([0.1, -0.1], 32)
    assert detect_period(window, detrend=False) == 0


def test_period_rejects_two_dimensional_input() -> None:
    with pytest.raises(ValueError, match="1-D"):
        detect_period(np.zeros((4, 4)))


def test_period_rejects_bad_max_period() -> None:
    with pytest.raises(ValueError, match="max_period"):
        detect_period(np.zeros(8), max_period=0)


# Bisection for the doubling points (module-scoped: each search takes about a second).


@pytest.fixture(scope="module")
def logistic_result() -> dict:
    return ground_truth.run_ground_truth("logistic-map", max_doublings=4)


@pytest.fixture(scope="module")
def noisy_logistic_points() -> np.ndarray:
    def orbit(r: np.ndarray) -> np.ndarray:
        return _with_noise(ground_truth.logistic_orbit(r), NOISE, seed=1)

    return ground_truth.period_doubling_points(orbit, 2.8, 3.5695, 4, tolerance=1e-6)


@pytest.mark.parametrize("index", range(4))
def test_logistic_doubling_point_bisection(logistic_result: dict, index: int) -> None:
    measured = logistic_result["measured"][index]
    assert abs(measured - ground_truth.LOGISTIC_DOUBLINGS[index]) < 1e-3


@pytest.mark.parametrize("index", range(4))
def test_logistic_doubling_point_with_noise(noisy_logistic_points: np.ndarray, index: int) -> None:
    measured = noisy_logistic_points[index]
    assert abs(measured - ground_truth.LOGISTIC_DOUBLINGS[index]) < 1e-3


def test_logistic_feigenbaum_ratio(logistic_result: dict) -> None:
    r1, r2, r3, r4 = logistic_result["measured"]
    ratio = (r3 - r2) / (r4 - r3)
    assert abs(ratio / ground_truth.FEIGENBAUM_DELTA - 1) < 0.02


def _double_well_doubling_oracle(period: int, lr_in_window: float) -> float:
    """Solve the cycle equations with prod f'(x_i) = -1 by scipy's fsolve, from a plain orbit."""
    x = 1.1
    for _ in range(20_000):
        x = x - lr_in_window * (x**3 - x)
    cycle = []
    for _ in range(period):
        cycle.append(x)
        x = x - lr_in_window * (x**3 - x)

    def equations(unknowns: np.ndarray) -> np.ndarray:
        points, lr = unknowns[:-1], unknowns[-1]
        images = points - lr * (points**3 - points)
        derivatives = 1.0 - lr * (3.0 * points**2 - 1.0)
        return np.append(images - np.roll(points, -1), np.prod(derivatives) + 1.0)

    solution = fsolve(equations, np.append(cycle, lr_in_window), xtol=1e-13)
    return float(solution[-1])


@pytest.fixture(scope="module")
def double_well_result() -> dict:
    return ground_truth.run_ground_truth("double-well", max_doublings=4)


def test_double_well_first_doubling(double_well_result: dict) -> None:
    assert abs(double_well_result["measured"][0] - 1.0) < 1e-3


@pytest.mark.parametrize(("index", "lr_in_window"), [(1, 1.15), (2, 1.27), (3, 1.295)])
def test_double_well_later_doublings(
    double_well_result: dict, index: int, lr_in_window: float
) -> None:
    oracle = _double_well_doubling_oracle(2**index, lr_in_window)
    assert abs(double_well_result["measured"][index] - oracle) < 1e-3


@pytest.mark.parametrize("index", range(4))
def test_double_well_reference_matches_oracle(double_well_result: dict, index: int) -> None:
    # The module's own Newton reference agrees with the scipy oracle to solver precision.
    lr_in_window = [0.9, 1.15, 1.27, 1.295][index]
    oracle = 1.0 if index == 0 else _double_well_doubling_oracle(2**index, lr_in_window)
    assert abs(double_well_result["reference"][index] - oracle) < 1e-9


def test_double_well_noisy_doubling() -> None:
    def orbit(lr: np.ndarray) -> np.ndarray:
        return _with_noise(ground_truth.double_well_orbit(lr), NOISE, seed=2)

    measured = ground_truth.find_period_doubling(orbit, 2, 1.2, 1.26, tolerance=1e-6)
    assert abs(measured - _double_well_doubling_oracle(2, 1.15)) < 1e-3


def test_quadratic_stability_threshold() -> None:
    result = ground_truth.run_ground_truth("quadratic", curvature=4.0)
    assert abs(result["measured"][0] - 0.5) < 1e-6


def test_ground_truth_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown ground truth"):
        ground_truth.run_ground_truth("henon")


def test_bisection_rejects_bad_bracket() -> None:
    with pytest.raises(ValueError, match="bracket"):
        ground_truth.find_period_doubling(ground_truth.logistic_orbit, 1, 2.5, 2.9)


# Training-like series: slow drift, 2 then 4 branches, noise.


def _training_like_df(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    steps = np.arange(3000)
    drift = -0.05 + 2e-5 * steps + 0.01 * np.sin(2 * np.pi * steps / 3000)
    alternation = np.where(steps % 2 == 0, 1.0, -1.0)
    series = drift + 0.01 * alternation * (steps >= 1000)
    series += 0.003 * alternation * (steps % 4 >= 2) * (steps >= 2000)
    return steps, _with_noise(series, NOISE, seed)


def test_training_like_track_periods() -> None:
    steps, series = _training_like_df()
    track = period_track(series)
    assert np.all(track[100:950] == 1)
    assert np.all(track[1050:1950] == 2)
    assert np.all(track[2050:] == 4)


def test_training_like_doubling_events() -> None:
    steps, series = _training_like_df()
    events = period_doubling_events(period_track(series), steps)
    assert [(e.from_period, e.to_period) for e in events] == [(1, 2), (2, 4)]
    assert abs(events[0].step - 1000) <= 4
    assert abs(events[1].step - 2000) <= 4


def test_track_with_curved_drift() -> None:
    # Branches 100 times smaller than an exponentially decaying drift of dF.
    steps = np.arange(3000)
    series = -1e-3 * np.exp(-steps / 300) + 1e-5 * np.where(steps % 2 == 0, 1.0, -1.0)
    assert np.all(period_track(series) == 2)


def test_track_ignores_small_jitter() -> None:
    steps = np.arange(2000)
    series = np.where(steps % 2 == 0, 0.01, -0.01) + 1e-7 * np.sin(0.37 * steps)
    assert np.all(period_track(series) == 2)


def test_track_rejects_long_max_period() -> None:
    with pytest.raises(ValueError, match="max_period"):
        period_track(np.zeros(100), window=16, max_period=16)


def test_events_ignore_flicker() -> None:
    track = np.array([1] * 100 + [2] * 10 + [1] * 100 + [2] * 100)
    events = period_doubling_events(track, min_duration=32)
    assert events == [PeriodDoubling(step=210, from_period=1, to_period=2)]


def test_events_skip_long_aperiodic_gap() -> None:
    track = np.array([1] * 100 + [0] * 300 + [2] * 100)
    assert period_doubling_events(track, max_gap=128) == []


def test_events_skip_period_halving() -> None:
    track = np.array([2] * 100 + [1] * 100)
    assert period_doubling_events(track) == []


def test_cascades_chain_doublings() -> None:
    events = [PeriodDoubling(10, 1, 2), PeriodDoubling(20, 2, 4), PeriodDoubling(50, 1, 2)]
    assert [len(c) for c in doubling_cascades(events)] == [2, 1]


def test_cascades_by_cycle_onsets() -> None:
    cycle = [1] * 200 + [2] * 200 + [4] * 100
    track = np.array(cycle * 2)
    cycles = cascades_by_cycle(track, np.arange(track.size), period=500)
    assert [c.periods for c in cycles] == [(1, 2, 4), (1, 2, 4)]
    assert cycles[1].onset_steps == (700, 900)
