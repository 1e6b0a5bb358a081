"""Summarise the curvature probes of a run: sharpness against the edge 2/lr, trace, per cycle.

Sharpness is the top Hessian eigenvalue lambda_max. Gradient descent with learning rate lr is
linearly stable on a quadratic only while lambda_max < 2/lr, so 2/lr is the "edge". Across runs,
the curvature reduction of a dynamical loss is the ratio of its final lambda_max to that of the
static run with the same other options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

STATIC_COUNTERPARTS = {"dce": "ce", "dmse1": "mse", "dmse2": "mse"}
"""The static loss each dynamical loss reduces to."""

MATCH_KEYS = ("lr", "width", "depth", "seed", "dataset")
"""Flat record attributes that must agree between a dynamical run and its static match."""


@dataclass(frozen=True)
class Sharpness:
    """Sharpness of one run against the edge of stability 2/lr.

    Attributes
    ----------
    probe_step : numpy.ndarray of int, shape (M,)
        Step of each probe.
    lambda_max : numpy.ndarray, shape (M,)
        Top Hessian eigenvalue at each probe.
    edge : numpy.ndarray, shape (M,)
        2/lr at each probe.
    trace : numpy.ndarray, shape (M,)
        Hessian trace at each probe (nan where unknown).
    fraction_above_edge : float
        Fraction of probes with lambda_max > 2/lr.
    first_crossing_step : int or None
        Step of the first probe where lambda_max rises from below the edge to above it.
    lambda_max_final, edge_final, trace_final : float
        Values at the last probe.
    cycles : numpy.ndarray of int, shape (K,)
        Cycle index of each per-cycle entry (empty without a cycle period).
    lambda_max_cycle_end : numpy.ndarray, shape (K,)
        lambda_max at the last probe of each cycle.
    fraction_above_edge_per_cycle : numpy.ndarray, shape (K,)
        Fraction of each cycle's probes above the edge.
    """

    probe_step: np.ndarray
    lambda_max: np.ndarray
    edge: np.ndarray
    trace: np.ndarray
    fraction_above_edge: float
    first_crossing_step: int | None
    lambda_max_final: float
    edge_final: float
    trace_final: float
    cycles: np.ndarray
    lambda_max_cycle_end: np.ndarray
    fraction_above_edge_per_cycle: np.ndarray


@dataclass(frozen=True)
class CurvatureReduction:
    """Final sharpness of a dynamical run relative to its static match (ratio < 1: flatter)."""

    dynamical: str
    static: str
    lambda_max_dynamical: float
    lambda_max_static: float
    ratio: float


@dataclass(frozen=True)
class EdgeStretch:
    """Stretch of consecutive probes, of maximum length, with lambda_max near the edge 2/lr."""

    start_step: int
    end_step: int
    probes: int
    rtol: float

    @property
    def steps(self) -> int:
        """Length of the stretch in training steps (from its first to its last probe)."""
        return self.end_step - self.start_step


def longest_stretch_near_edge(
    probe_steps: np.ndarray,
    lambda_max: np.ndarray,
    edge: np.ndarray | float,
    rtol: float = 0.1,
) -> EdgeStretch | None:
    """Find the longest run of probes with |lambda_max - edge| <= rtol * edge.

    This is the signature of the edge of stability: lambda_max hovering near 2/lr. Returns None
    when no probe lies within the tolerance.
    """
    lambda_max = np.asarray(lambda_max, dtype=np.float64)
    edge_values = np.broadcast_to(np.asarray(edge, dtype=np.float64), lambda_max.shape)
    near = np.abs(lambda_max - edge_values) <= rtol * edge_values
    best: tuple[int, int] | None = None
    start = None
    for index, inside in enumerate(np.append(near, False)):
        if inside and start is None:
            start = index
        elif not inside and start is not None:
            if best is None or index - start > best[1] - best[0] + 1:
                best = (start, index - 1)
            start = None
    if best is None:
        return None
    steps = np.asarray(probe_steps, dtype=np.int64)
    return EdgeStretch(
        start_step=int(steps[best[0]]),
        end_step=int(steps[best[1]]),
        probes=best[1] - best[0] + 1,
        rtol=rtol,
    )


def first_upward_crossing(
    probe_steps: np.ndarray, lambda_max: np.ndarray, edge: np.ndarray | float
) -> int | None:
    """Return the first probe step where lambda_max rises from below the edge to above it.

    A run that starts above the edge (a sharp initialisation) has not crossed it there: the first
    crossing is the first rise after lambda_max has been below the edge.
    """
    above = np.asarray(lambda_max, dtype=np.float64) > np.asarray(edge, dtype=np.float64)
    rises = np.flatnonzero(above[1:] & ~above[:-1]) + 1
    return int(np.asarray(probe_steps)[rises[0]]) if rises.size else None


def sharpness(
    probe_steps: np.ndarray,
    lambda_max: np.ndarray,
    lr: float | np.ndarray,
    *,
    trace: np.ndarray | None = None,
    period: int | None = None,
) -> Sharpness:
    """Compare the top Hessian eigenvalue with the edge 2/lr, in total and per cycle.

    Parameters
    ----------
    probe_steps : array_like of int, shape (M,)
        Step of each probe.
    lambda_max : array_like, shape (M,)
        Top eigenvalue at each probe.
    lr : float or array_like of shape (M,)
        Learning rate at each probe.
    trace : array_like, shape (M,), optional
        Hessian trace at each probe.
    period : int, optional
        Oscillation period T in steps, for the per-cycle values.
    """
    probe_steps = np.asarray(probe_steps, dtype=np.int64)
    lambda_max = np.asarray(lambda_max, dtype=np.float64)
    if probe_steps.size == 0 or probe_steps.shape != lambda_max.shape:
        raise ValueError(
            f"{probe_steps.size} probe steps and lambda_max of shape {lambda_max.shape}: pass "
            "one eigenvalue per probe, at least one probe"
        )
    edge = 2.0 / np.broadcast_to(np.asarray(lr, dtype=np.float64), lambda_max.shape)
    trace = np.full(lambda_max.shape, np.nan) if trace is None else np.asarray(trace, float)

    above = lambda_max > edge
    first_crossing = first_upward_crossing(probe_steps, lambda_max, edge)

    cycles = np.empty(0, dtype=np.int64)
    cycle_end = np.empty(0)
    cycle_fraction = np.empty(0)
    if period is not None:
        if period < 1:
            raise ValueError(f"invalid period {period}: use the oscillation period in steps")
        cycle_of = probe_steps // period
        cycles = np.unique(cycle_of)
        cycle_end = np.array([lambda_max[cycle_of == c][-1] for c in cycles])
        cycle_fraction = np.array([above[cycle_of == c].mean() for c in cycles])

    return Sharpness(
        probe_step=probe_steps,
        lambda_max=lambda_max,
        edge=np.array(edge),
        trace=trace,
        fraction_above_edge=float(above.mean()),
        first_crossing_step=first_crossing,
        lambda_max_final=float(lambda_max[-1]),
        edge_final=float(edge[-1]),
        trace_final=float(trace[-1]),
        cycles=cycles,
        lambda_max_cycle_end=cycle_end,
        fraction_above_edge_per_cycle=cycle_fraction,
    )


def curvature_reduction(
    runs: Sequence[Mapping[str, Any]], *, match_keys: Sequence[str] = MATCH_KEYS
) -> list[CurvatureReduction]:
    """Pair each dynamical run with a static run of the same options and compare sharpness.

    Parameters
    ----------
    runs : sequence of mapping
        One per run, with `name`, `loss`, `amplitude`, `lambda_max_final` and the `match_keys`.
        A run is static when its amplitude is 1 or its loss is static.
    match_keys : sequence of str
        Options that must be equal between the two runs of a pair.

    Returns
    -------
    list of CurvatureReduction
        One per dynamical run that has a static match; the first match in `runs` is used.
    """
    reductions: list[CurvatureReduction] = []
    static_runs = [run for run in runs if not _is_dynamical(run)]
    for run in runs:
        if not _is_dynamical(run):
            continue
        wanted_loss = STATIC_COUNTERPARTS.get(str(run.get("loss")))
        for candidate in static_runs:
            same = all(candidate.get(key) == run.get(key) for key in match_keys)
            loss_matches = candidate.get("loss") in (wanted_loss, run.get("loss"))
            if same and loss_matches:
                dynamical_value = float(run["lambda_max_final"])
                static_value = float(candidate["lambda_max_final"])
                reductions.append(
                    CurvatureReduction(
                        dynamical=str(run.get("name")),
                        static=str(candidate.get("name")),
                        lambda_max_dynamical=dynamical_value,
                        lambda_max_static=static_value,
                        ratio=dynamical_value / static_value if static_value else float("nan"),
                    )
                )
                break
    return reductions


def _is_dynamical(run: Mapping[str, Any]) -> bool:
    amplitude = run.get("amplitude")
    return run.get("loss") in STATIC_COUNTERPARTS and amplitude is not None and amplitude > 1.0
