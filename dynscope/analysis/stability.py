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
from dynscope.analysis.sharpness import first_upward_crossing


@dataclass(frozen=True)
class EdgeOfStability:
    """Lag between the first crossing of 2/lr and the first period-2 onset after it.

    Attributes
    ----------
    crossing_step : int or None
        First probe step with lambda_max > 2/lr.
    period2_step : int or None
        Step of the first doubling 1 -> 2 at or after the crossing (any 1 -> 2 when there is no
        crossing).
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
    crossing = first_upward_crossing(probe_steps, np.asarray(lambda_max), edge)

    events = period_doubling_events(track, steps, min_duration=min_duration, max_gap=max_gap)
    onsets = [e.step for e in events if e.from_period == 1 and e.to_period == 2]
    if crossing is not None:
        # The crossing happened somewhere after the previous probe, so an onset in that interval
        # follows it within the probe resolution (its lag reads negative, at most one interval).
        index = int(np.flatnonzero(probe_steps == crossing)[0])
        earliest = probe_steps[index - 1] + 1 if index > 0 else crossing
        onsets = [step for step in onsets if step >= earliest]
    onset = onsets[0] if onsets else None

    lag = onset - crossing if onset is not None and crossing is not None else None
    return EdgeOfStability(crossing_step=crossing, period2_step=onset, lag=lag)


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
