"""Measure the edge-of-stability lag: from lambda_max crossing 2/lr to the onset of period 2.

On a quadratic, GD starts to alternate (period 2) as soon as lambda_max exceeds 2/lr. In a
network the alternation shows up in dF some steps after the crossing; the lag is that delay. It is
measured once over the whole run and, given the oscillation period, once per cycle.

Limits: the crossing is only known to the resolution of the probes (every `hessian_every` steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynscope.analysis.periods import period_doubling_events


@dataclass(frozen=True)
class EdgeOfStability:
    """Lag between lambda_max rising through 2/lr and the period-2 onset that follows.

    Attributes
    ----------
    crossing_step : int or None
        Probe step of the last rise of lambda_max through 2/lr before the first period-2 onset
        that has one; the first rise when no onset follows one.
    period2_step : int or None
        Step of that doubling 1 -> 2 (the first 1 -> 2 when no rise precedes any).
    lag : int or None
        period2_step - crossing_step, when both exist.
    cycle : int or None
        Cycle index for a per-cycle result, None for the whole run.
    """

    crossing_step: int | None
    period2_step: int | None
    lag: int | None
    cycle: int | None = None


def edge_of_stability_lag(
    probe_steps: np.ndarray,
    lambda_max: np.ndarray,
    edge: float | np.ndarray,
    track: np.ndarray,
    steps: np.ndarray,
    *,
    min_duration: int = 32,
    max_gap: int = 128,
) -> EdgeOfStability:
    """Measure the lag between lambda_max first exceeding the edge and the onset of period 2.

    Parameters
    ----------
    probe_steps, lambda_max : array_like, shape (M,)
        Probe steps and top Hessian eigenvalues.
    edge : float or array_like of shape (M,)
        2/lr at each probe.
    track, steps : array_like of int, shape (n,)
        Period track of the observable and the step of each entry.
    min_duration, max_gap : int
        As in `period_doubling_events`.
    """
    probe_steps = np.asarray(probe_steps, dtype=np.int64)
    above = np.asarray(lambda_max, dtype=np.float64) > np.asarray(edge, dtype=np.float64)
    rises = np.flatnonzero(above[1:] & ~above[:-1]) + 1

    events = period_doubling_events(track, steps, min_duration=min_duration, max_gap=max_gap)
    onsets = [e.step for e in events if e.from_period == 1 and e.to_period == 2]
    for onset in onsets:
        # A rise seen at probe i happened after probe i - 1, so it precedes an onset within that
        # interval too (the lag then reads negative, by less than one probe interval).
        preceding = [i for i in rises if probe_steps[i - 1] < onset]
        if preceding:
            crossing = int(probe_steps[preceding[-1]])
            return EdgeOfStability(crossing_step=crossing, period2_step=onset, lag=onset - crossing)

    first_rise = int(probe_steps[rises[0]]) if rises.size else None
    first_onset = onsets[0] if onsets else None
    return EdgeOfStability(crossing_step=first_rise, period2_step=first_onset, lag=None)


def edge_of_stability_per_cycle(
    probe_steps: np.ndarray,
    lambda_max: np.ndarray,
    edge: float | np.ndarray,
    track: np.ndarray,
    steps: np.ndarray,
    period: int,
    *,
    min_duration: int = 32,
    max_gap: int = 128,
) -> list[EdgeOfStability]:
    """Measure the edge-of-stability lag inside each oscillation cycle of period `period`."""
    if period < 1:
        raise ValueError(f"invalid period {period}: use the oscillation period in steps")
    probe_steps = np.asarray(probe_steps, dtype=np.int64)
    edge = np.broadcast_to(np.asarray(edge, dtype=np.float64), probe_steps.shape)
    lambda_max = np.asarray(lambda_max, dtype=np.float64)
    track = np.asarray(track)
    steps = np.asarray(steps, dtype=np.int64)

    results = []
    for cycle in np.unique(steps // period):
        probes = probe_steps // period == cycle
        entries = steps // period == cycle
        result = edge_of_stability_lag(
            probe_steps[probes],
            lambda_max[probes],
            edge[probes],
            track[entries],
            steps[entries],
            min_duration=min_duration,
            max_gap=max_gap,
        )
        results.append(
            EdgeOfStability(result.crossing_step, result.period2_step, result.lag, int(cycle))
        )
    return results
