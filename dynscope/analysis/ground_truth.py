"""Reproduce known period-doubling cascades to check the period detection.

Three one-dimensional maps with known bifurcations:

- the logistic map x -> r x (1 - x), doubling at r1 = 3, r2 = 1 + sqrt(6), r3 = 3.544090,
  r4 = 3.564407, with Feigenbaum's delta 4.669202 as the limit of the ratios of their gaps;
- gradient descent on the double well (x^2 - 1)^2 / 4, the map x -> x - lr (x^3 - x); the
  minimum x = 1 has curvature 2, so GD loses stability at lr = 1 and period-doubles beyond it;
- gradient descent on the quadratic lambda x^2 / 2, stable if and only if lr < 2 / lambda.

The doubling points are found by bisecting the control parameter with `detect_period` on orbits
after a long transient, many parameter values at once. The double-well reference values come from
a different method: Newton's method on the cycle equations with the multiplier prod f'(x_i) = -1.

Limits: close to a doubling point the transient decays slowly because the multiplier is near -1,
so a finite transient moves the measured point, mostly below the true one. With the default
transient of 2**15 iterations the shift is below 2e-4 for the first five doublings of both maps,
largest for the first doubling (measured in the READMEs under analyses/).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from dynscope.analysis.periods import detect_period

logger = logging.getLogger(__name__)

LOGISTIC_DOUBLINGS = (3.0, 1.0 + math.sqrt(6.0), 3.544090, 3.564407, 3.568759)
"""Known period-doubling points r1..r5 of the logistic map."""

LOGISTIC_ACCUMULATION = 3.569946
FEIGENBAUM_DELTA = 4.669202

DEFAULT_TRANSIENT = 2**15
DEFAULT_LENGTH = 256
_GRID_SIZE = 33  # parameter values per multisection round


Orbit = Callable[[np.ndarray], np.ndarray]
"""A function from control values (R,) to orbits (R, length) after the transient."""


def logistic_orbit(
    r: float | np.ndarray,
    *,
    x0: float = 0.3,
    transient: int = DEFAULT_TRANSIENT,
    length: int = DEFAULT_LENGTH,
) -> np.ndarray:
    """Iterate the logistic map x -> r x (1 - x) and return the orbit after a transient.

    Parameters
    ----------
    r : float or array_like
        Control parameter(s); an array gives one orbit per value.
    x0 : float
        Initial point in (0, 1).
    transient : int
        Iterations discarded before recording.
    length : int
        Iterations recorded.

    Returns
    -------
    numpy.ndarray
        Shape r.shape + (length,).
    """
    return _iterate(lambda x, r_: r_ * x * (1.0 - x), r, x0, transient, length)


def double_well_map(x: np.ndarray, lr: float | np.ndarray) -> np.ndarray:
    """Apply one GD step on the double well (x^2 - 1)^2 / 4: x -> x - lr (x^3 - x)."""
    return x - lr * (x**3 - x)


def double_well_orbit(
    lr: float | np.ndarray,
    *,
    x0: float = 1.1,
    transient: int = DEFAULT_TRANSIENT,
    length: int = DEFAULT_LENGTH,
) -> np.ndarray:
    """Run GD on the double well and return the iterates after a transient.

    Orbits that escape to infinity (lr beyond the cascade) come back as NaN, which
    `detect_period` reads as aperiodic. Shapes as in `logistic_orbit`.
    """
    return _iterate(double_well_map, lr, x0, transient, length)


def quadratic_orbit(
    lr: float | np.ndarray, curvature: float = 1.0, *, x0: float = 1.0, steps: int = 100
) -> np.ndarray:
    """Run GD on curvature * x^2 / 2 in closed form: x_t = (1 - lr * curvature)^t x0.

    Returns shape lr.shape + (steps + 1,), starting with x0.
    """
    lr = np.asarray(lr, dtype=np.float64)
    factors = 1.0 - lr * curvature
    exponents = np.arange(steps + 1)
    with np.errstate(over="ignore"):
        return x0 * np.power(factors[..., None], exponents)


def period_of_orbits(
    orbits: np.ndarray, max_period: int = 64, rtol: float | None = None
) -> np.ndarray:
    """Return `detect_period` of each row of an array of orbits."""
    rows = np.asarray(orbits).reshape(-1, np.shape(orbits)[-1])
    periods = [detect_period(row, max_period, rtol) for row in rows]
    return np.asarray(periods, dtype=np.int64).reshape(np.shape(orbits)[:-1])


def find_period_doubling(
    orbit: Orbit,
    period: int,
    low: float,
    high: float,
    *,
    tolerance: float = 1e-7,
    max_period: int = 64,
) -> float:
    """Locate where the period of a map's orbit grows past `period`, by multisection.

    Parameters
    ----------
    orbit : callable
        Control values (R,) to orbits (R, length) after a transient.
    period : int
        Period before the doubling (1 for the first, 2 for the second, ...).
    low, high : float
        Bracket: the period is at most `period` at `low` and larger (or aperiodic) at `high`.
    tolerance : float
        Width of the final bracket.
    max_period : int
        Largest period `detect_period` tests.

    Returns
    -------
    float
        Middle of the final bracket.
    """
    if not _beyond(orbit(np.array([high])), period, max_period)[0]:
        raise ValueError(
            f"invalid bracket high={high}: the period there is not above {period}; "
            "pass a value past the doubling"
        )
    if _beyond(orbit(np.array([low])), period, max_period)[0]:
        raise ValueError(
            f"invalid bracket low={low}: the period there is already above {period}; "
            "pass a value before the doubling"
        )

    while high - low > tolerance:
        grid = np.linspace(low, high, _GRID_SIZE)
        beyond = _beyond(orbit(grid), period, max_period)
        first = int(np.argmax(beyond[1:])) + 1  # grid[-1] is beyond by the invariant
        low, high = float(grid[first - 1]), float(grid[first])
    return (low + high) / 2.0


def period_doubling_points(
    orbit: Orbit,
    low: float,
    high: float,
    count: int = 4,
    *,
    grid_size: int = 2000,
    tolerance: float = 1e-7,
    max_period: int = 64,
) -> np.ndarray:
    """Find the first `count` period doublings 1 -> 2 -> 4 ... of a map in [low, high].

    A scan of `grid_size` values brackets each doubling (the first value whose period exceeds
    2**(k-1)), then `find_period_doubling` refines it.
    """
    grid = np.linspace(low, high, grid_size)
    periods = period_of_orbits(orbit(grid), max_period)
    points = []
    for k in range(1, count + 1):
        period = 2 ** (k - 1)
        beyond = (periods == 0) | (periods > period)
        if not beyond.any() or beyond[0]:
            raise ValueError(
                f"doubling {k} (period {period} -> {2 * period}) is not inside "
                f"[{low}, {high}]: widen the range or ask for fewer doublings"
            )
        first = int(np.argmax(beyond))
        points.append(
            find_period_doubling(
                orbit,
                period,
                float(grid[first - 1]),
                float(grid[first]),
                tolerance=tolerance,
                max_period=max_period,
            )
        )
    return np.asarray(points)


def feigenbaum_ratios(points: np.ndarray) -> np.ndarray:
    """Return the ratios (p_k - p_{k-1}) / (p_{k+1} - p_k) of successive doubling points."""
    points = np.asarray(points, dtype=np.float64)
    gaps = np.diff(points)
    return gaps[:-1] / gaps[1:]


def double_well_cycle_doubling(period: int, guess_lr: float) -> float:
    """Find the lr at which the double-well GD cycle of length `period` loses stability.

    Solves, with Newton's method, the cycle equations x_{i+1} = f(x_i) (indices mod period)
    together with the multiplier condition prod f'(x_i) = -1, starting from the stable cycle at
    `guess_lr`. This does not use period detection, so it checks `period_doubling_points`.
    """
    cycle = double_well_orbit(guess_lr)[-period:]
    unknowns = np.concatenate((cycle, [guess_lr]))

    for _ in range(100):
        residual, jacobian = _cycle_system(unknowns, period)
        update = np.linalg.solve(jacobian, -residual)
        unknowns = unknowns + update
        if np.max(np.abs(update)) < 1e-14:
            break
    else:
        raise ValueError(f"Newton's method did not converge for period {period} from lr={guess_lr}")
    return float(unknowns[-1])


def run_ground_truth(name: str, **params: Any) -> dict[str, Any]:
    """Measure a ground-truth cascade and compare it with its reference values.

    Parameters
    ----------
    name : {"logistic-map", "double-well", "quadratic"}
        The map; underscores may replace the dashes.
    **params
        `max_doublings` (default 4), `transient`, `length`, `tolerance` (width of the final
        bisection bracket); for "quadratic", `curvature` (default 2.0) and `steps`.

    Returns
    -------
    dict
        JSON-ready: `name`, `parameter`, `measured`, `reference`, `errors` (lists, one entry per
        doubling or threshold), `max_error`, and for the cascades `feigenbaum_ratios`.
    """
    systems: dict[str, Callable[..., dict[str, Any]]] = {
        "logistic-map": _logistic_ground_truth,
        "double-well": _double_well_ground_truth,
        "quadratic": _quadratic_ground_truth,
    }
    system = systems.get(name.replace("_", "-"))
    if system is not None:
        try:
            return system(**params)
        except TypeError as error:
            raise ValueError(f"invalid parameters for ground truth {name!r}: {error}") from None
    raise ValueError(f"unknown ground truth {name!r}: use logistic-map, double-well or quadratic")


def _logistic_ground_truth(
    max_doublings: int = 4,
    transient: int = DEFAULT_TRANSIENT,
    length: int = DEFAULT_LENGTH,
    tolerance: float = 1e-7,
) -> dict[str, Any]:
    if not 1 <= max_doublings <= len(LOGISTIC_DOUBLINGS):
        raise ValueError(
            f"invalid max_doublings {max_doublings}: use 1 to {len(LOGISTIC_DOUBLINGS)}"
        )

    def orbit(r: np.ndarray) -> np.ndarray:
        return logistic_orbit(r, transient=transient, length=length)

    measured = period_doubling_points(orbit, 2.8, 3.5695, max_doublings, tolerance=tolerance)
    reference = np.asarray(LOGISTIC_DOUBLINGS[:max_doublings])
    return _comparison("logistic-map", "r", measured, reference)


def _double_well_ground_truth(
    max_doublings: int = 4,
    transient: int = DEFAULT_TRANSIENT,
    length: int = DEFAULT_LENGTH,
    tolerance: float = 1e-7,
) -> dict[str, Any]:
    def orbit(lr: np.ndarray) -> np.ndarray:
        return double_well_orbit(lr, transient=transient, length=length)

    if not 1 <= max_doublings <= 5:
        raise ValueError(f"invalid max_doublings {max_doublings}: use 1 to 5")
    measured = period_doubling_points(orbit, 0.9, 1.305, max_doublings, tolerance=tolerance)

    # The reference: lr1 = 1 exactly (f'(1) = 1 - 2 lr), later ones from the cycle multipliers,
    # each started from the measured stable cycle just below its doubling.
    reference = [1.0]
    for k in range(2, max_doublings + 1):
        guess = measured[k - 1] - 0.2 * (measured[k - 1] - measured[k - 2])
        reference.append(double_well_cycle_doubling(2 ** (k - 1), guess))
    return _comparison("double-well", "lr", measured, np.asarray(reference))


def _quadratic_ground_truth(
    curvature: float = 2.0, steps: int = 2000, tolerance: float = 1e-9
) -> dict[str, Any]:
    if not curvature > 0:
        raise ValueError(f"invalid curvature {curvature}: use a positive curvature")

    # GD is stable when the iterate does not grow; bisect lr on that.
    low, high = 0.0, 4.0 / curvature
    while high - low > tolerance:
        middle = (low + high) / 2.0
        final = abs(float(quadratic_orbit(middle, curvature, steps=steps)[-1]))
        if final < 1.0:
            low = middle
        else:
            high = middle
    measured = np.asarray([(low + high) / 2.0])
    result = _comparison("quadratic", "lr", measured, np.asarray([2.0 / curvature]))
    result["curvature"] = curvature
    return result


def _comparison(
    name: str, parameter: str, measured: np.ndarray, reference: np.ndarray
) -> dict[str, Any]:
    errors = measured - reference
    result: dict[str, Any] = {
        "name": name,
        "parameter": parameter,
        "measured": measured.tolist(),
        "reference": reference.tolist(),
        "errors": errors.tolist(),
        "max_error": float(np.max(np.abs(errors))),
    }
    if measured.size >= 3:
        result["feigenbaum_ratios"] = feigenbaum_ratios(measured).tolist()
        result["feigenbaum_delta"] = FEIGENBAUM_DELTA
    logger.info("%s: measured %s, reference %s", name, result["measured"], result["reference"])
    return result


def _beyond(orbits: np.ndarray, period: int, max_period: int) -> np.ndarray:
    """Return, per orbit, whether its period exceeds `period` (aperiodic counts as beyond)."""
    periods = period_of_orbits(orbits, max_period)
    return (periods == 0) | (periods > period)


def _iterate(
    step: Callable[[np.ndarray, np.ndarray], np.ndarray],
    parameter: float | np.ndarray,
    x0: float,
    transient: int,
    length: int,
) -> np.ndarray:
    parameter = np.asarray(parameter, dtype=np.float64)
    x = np.full(parameter.shape, x0, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(transient):
            x = step(x, parameter)
        orbit = np.empty(parameter.shape + (length,))
        for index in range(length):
            orbit[..., index] = x
            x = step(x, parameter)
    orbit[~np.isfinite(orbit)] = np.nan
    return orbit


def _cycle_system(unknowns: np.ndarray, period: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the residual and Jacobian of the double-well cycle-doubling equations."""
    x, lr = unknowns[:period], unknowns[-1]
    following = np.roll(x, -1)
    derivative = 1.0 - lr * (3.0 * x**2 - 1.0)  # f'(x)
    second = -6.0 * lr * x  # f''(x)
    residual = np.empty(period + 1)
    jacobian = np.zeros((period + 1, period + 1))

    for i in range(period):
        j = (i + 1) % period
        residual[i] = double_well_map(x[i], lr) - following[i]
        jacobian[i, i] += derivative[i]
        jacobian[i, j] -= 1.0
        jacobian[i, -1] = -(x[i] ** 3 - x[i])

    residual[-1] = np.prod(derivative) + 1.0
    for i in range(period):
        others = np.prod(np.delete(derivative, i))
        jacobian[-1, i] = others * second[i]
    jacobian[-1, -1] = sum(
        np.prod(np.delete(derivative, i)) * -(3.0 * x[i] ** 2 - 1.0) for i in range(period)
    )
    return residual, jacobian
