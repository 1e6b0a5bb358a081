"""Detect periods of a series and the period-doubling cascades in a training run.

A window of a series has period p when |x[t+p] - x[t]| <= tol for every t in the window. With
`detrend=True` (the default) the test is on the second difference x[t+2p] - 2 x[t+p] + x[t]
instead. It is zero for a p-periodic series plus a linear drift and of order p^2 x'' for a smooth
drift, so the slow change of the one-step loss change dF while its branches persist does not read
as aperiodic. The smallest such p up to `max_period` is the period; 0 means none was
found. A window must show its pattern repeat: p <= n // 2 for the plain test and p <= n // 3 with
`detrend` (the second difference spans 2p entries).

`period_track` slides a window along the whole series and judges every window with one tolerance
taken from the scale of the whole series, so jitter far below the size of the branches is not a
new period. A change of period makes the windows that straddle it aperiodic for about one window
length; `period_doubling_events` bridges such gaps.

Limits: a drift whose curvature p^2 x'' exceeds the tolerance (a fast initial transient) still
reads as aperiodic, and a period-doubling onset is only seen once the new branches separate by
more than the tolerance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

logger = logging.getLogger(__name__)

DEFAULT_RTOL = 1e-3
"""Default tolerance relative to the spread of a window (or of the whole series in a track)."""

TRACK_RTOL = 2e-2
"""Default tolerance of `period_track`, relative to the scale of the whole series.

On a recorded spiral run (A = 70, T = 2500, lr = 1) the period-2 branches of dF carry a slower
modulation of 1 to 3 % of the branch spacing; 2 % reads the branches as period 2 and the later
splitting as period 4, while 1e-3 calls the whole bubble aperiodic.
"""

NOISE_FLOOR = 1e-4
"""Values of a window that agree to this fraction of the window's largest magnitude are equal.

The floor makes a period-1 window (zero spread) with float noise read as period 1; noise of 1e-6
relative is well below it.
"""

_CHUNK = 65_536  # windows processed at once, to bound the memory of the sliding views


@dataclass(frozen=True)
class PeriodDoubling:
    """One period doubling: at `step` the period changes from `from_period` to `to_period`."""

    step: int
    from_period: int
    to_period: int


@dataclass(frozen=True)
class CycleCascade:
    """The period-doubling cascade inside one oscillation cycle of a dynamical loss.

    Attributes
    ----------
    cycle : int
        Index of the cycle: steps [cycle * T, (cycle + 1) * T).
    start_step : int
        First step of the cycle.
    periods : tuple of int
        Periods of the cascade in order, starting with the period before the first doubling,
        for example (1, 2, 4). Empty when the cycle has no doubling.
    onset_steps : tuple of int
        Step of each doubling, one fewer than `periods`.
    max_period : int
        Largest period seen in the cycle's track (0 when the whole cycle is aperiodic).
    """

    cycle: int
    start_step: int
    periods: tuple[int, ...]
    onset_steps: tuple[int, ...]
    max_period: int


def detect_period(
    x: np.ndarray,
    max_period: int = 64,
    rtol: float | None = None,
    *,
    atol: float | None = None,
    detrend: bool = True,
) -> int:
    """Find the smallest period of a window of a series.

    Parameters
    ----------
    x : array_like, shape (n,)
        The window. Periods up to n // 3 (n // 2 without `detrend`) are tested.
    max_period : int
        Largest period tested.
    rtol : float, optional
        Tolerance relative to the window's spread max(x) - min(x); default `DEFAULT_RTOL`.
    atol : float, optional
        Absolute tolerance floor; default `NOISE_FLOOR` times max |x| of the window, so a
        constant window with float noise has period 1.
    detrend : bool
        Test the second difference x[t+2p] - 2 x[t+p] + x[t] rather than x[t+p] - x[t], so a
        linear drift is allowed and a smooth one nearly so.

    Returns
    -------
    int
        The period, or 0 when no period up to `max_period` fits (aperiodic, or not finite).
    """
    values = np.asarray(x, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"invalid window of shape {values.shape}: pass a 1-D series")
    _check_max_period(max_period)
    if values.size < 2 or not np.all(np.isfinite(values)):
        return 0

    rtol = DEFAULT_RTOL if rtol is None else rtol
    if atol is None:
        atol = NOISE_FLOOR * float(np.max(np.abs(values)))
    tolerance = max(rtol * float(np.ptp(values)), atol)

    for period in range(1, min(max_period, values.size // _span(detrend)) + 1):
        if np.max(np.abs(_differences(values, period, detrend))) <= tolerance:
            return period
    return 0


def period_track(
    x: np.ndarray,
    window: int = 64,
    max_period: int = 16,
    rtol: float | None = None,
    *,
    detrend: bool = True,
) -> np.ndarray:
    """Compute the period of the window around every entry of a series.

    Every window is judged with one tolerance, `rtol` times the scale of the whole series (the
    range between its 1st and 99th percentiles, so a short initial transient does not set it).

    Parameters
    ----------
    x : array_like, shape (n,)
        The series, for example dF.
    window : int
        Window length in entries; the window of entry t is centred on t and clipped to the series.
    max_period : int
        Largest period tested; at most window // 3 (window // 2 without `detrend`).
    rtol : float, optional
        Tolerance relative to the scale of the series; default `TRACK_RTOL`.
    detrend : bool
        Allow a smooth drift inside each window (see `detect_period`).

    Returns
    -------
    numpy.ndarray of int64, shape (n,)
        The period of each entry's window, 0 where none fits. All zeros when n < window.
    """
    values = np.asarray(x, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"invalid series of shape {values.shape}: pass a 1-D series")
    _check_max_period(max_period)
    if window < 2:
        raise ValueError(f"invalid window {window}: use a window of at least 2 entries")
    if max_period > window // _span(detrend):
        raise ValueError(
            f"invalid max_period {max_period} for window {window}: a window must show the pattern "
            f"repeat, so use max_period <= {window // _span(detrend)} or a longer window"
        )
    size = values.size
    if size < window:
        logger.warning("series of %d entries is shorter than the window %d", size, window)
        return np.zeros(size, dtype=np.int64)

    tolerance = (TRACK_RTOL if rtol is None else rtol) * series_scale(values)
    window_periods = _window_periods(values, window, max_period, tolerance, detrend)

    # Window w covers entries [w, w + window); entry t takes the window centred on it.
    starts = np.clip(np.arange(size) - window // 2, 0, size - window)
    return window_periods[starts]


def series_scale(x: np.ndarray) -> float:
    """Return the scale of a series: the range between its 1st and 99th percentiles.

    Non-finite values are ignored. Falls back to max |x| when that range is zero, and to 1 for a
    series of zeros, so a tolerance built from it is never zero.
    """
    values = np.asarray(x, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 1.0
    low, high = np.percentile(finite, [1.0, 99.0])
    scale = float(high - low)
    if scale > 0.0:
        return scale
    largest = float(np.max(np.abs(finite)))
    return largest if largest > 0.0 else 1.0


def period_doubling_events(
    track: np.ndarray,
    steps: np.ndarray | None = None,
    *,
    min_duration: int = 32,
    max_gap: int = 128,
) -> list[PeriodDoubling]:
    """Find the period doublings p -> 2p in a period track.

    Runs of one nonzero period shorter than `min_duration` entries are flicker and are dropped.
    Two kept runs in a row with periods p and 2p, separated by at most `max_gap` entries of other
    values, make one doubling. Its step is the middle of the gap between them, which for centred
    windows estimates the step at which the new period starts.

    Parameters
    ----------
    track : array_like of int, shape (n,)
        Output of `period_track`.
    steps : array_like of int, shape (n,), optional
        Step of each entry; default 0..n-1.
    min_duration : int
        Minimum length of a run, in entries, for its period to count.
    max_gap : int
        Largest gap, in entries, between the two runs of a doubling. The default is two default
        windows, since a change of period makes about one window of entries aperiodic.

    Returns
    -------
    list of PeriodDoubling
        In order of step.
    """
    track = np.asarray(track, dtype=np.int64)
    steps = np.arange(track.size) if steps is None else np.asarray(steps, dtype=np.int64)
    if steps.shape != track.shape:
        raise ValueError(
            f"steps of shape {steps.shape} do not match the track of shape {track.shape}: "
            "pass one step per track entry"
        )

    runs = _merge_runs([run for run in _runs(track) if run[0] != 0 and run[2] >= min_duration])
    events: list[PeriodDoubling] = []
    for previous, current in zip(runs[:-1], runs[1:], strict=True):
        period_before, start_before, length_before = previous
        period_after, start_after, _ = current
        gap_start = start_before + length_before
        if period_after != 2 * period_before or start_after - gap_start > max_gap:
            continue
        if start_after == gap_start:
            step = int(steps[start_after])
        else:
            step = int(round((steps[gap_start - 1] + steps[start_after]) / 2))
        events.append(PeriodDoubling(step, period_before, period_after))
    return events


def doubling_cascades(events: list[PeriodDoubling]) -> list[list[PeriodDoubling]]:
    """Group consecutive doublings into cascades 1 -> 2 -> 4 -> ...

    A cascade is a chain of events in which each one starts from the period the previous one
    reached. Any other event starts a new chain.
    """
    cascades: list[list[PeriodDoubling]] = []
    for event in events:
        if cascades and cascades[-1][-1].to_period == event.from_period:
            cascades[-1].append(event)
        else:
            cascades.append([event])
    return cascades


def cascades_by_cycle(
    track: np.ndarray,
    steps: np.ndarray,
    period: int,
    *,
    min_duration: int = 32,
    max_gap: int = 128,
) -> list[CycleCascade]:
    """Split a period track into oscillation cycles and report the cascade inside each.

    Parameters
    ----------
    track, steps : array_like of int, shape (n,)
        Period track and the step of each entry.
    period : int
        Period T of the loss oscillation, in steps.
    min_duration, max_gap : int
        As in `period_doubling_events`, applied inside each cycle.

    Returns
    -------
    list of CycleCascade
        One per cycle that has entries in the track; the longest chain of doublings in a cycle
        is its cascade.
    """
    if period < 1:
        raise ValueError(f"invalid period {period}: use the oscillation period in steps (>= 1)")
    track = np.asarray(track, dtype=np.int64)
    steps = np.asarray(steps, dtype=np.int64)

    cycles: list[CycleCascade] = []
    for cycle in np.unique(steps // period):
        inside = steps // period == cycle
        events = period_doubling_events(
            track[inside], steps[inside], min_duration=min_duration, max_gap=max_gap
        )
        chains = doubling_cascades(events)
        chain = max(chains, key=len) if chains else []
        periods = (chain[0].from_period,) + tuple(e.to_period for e in chain) if chain else ()
        cycles.append(
            CycleCascade(
                cycle=int(cycle),
                start_step=int(cycle * period),
                periods=periods,
                onset_steps=tuple(e.step for e in chain),
                max_period=int(track[inside].max()),
            )
        )
    return cycles


def _check_max_period(max_period: int) -> None:
    if not isinstance(max_period, (int, np.integer)) or max_period < 1:
        raise ValueError(f"invalid max_period {max_period!r}: use an integer >= 1")


def _span(detrend: bool) -> int:
    """Return how many periods a window must hold, one more than the tested difference spans."""
    return 3 if detrend else 2


def _differences(values: np.ndarray, period: int, detrend: bool) -> np.ndarray:
    """Return x[t+p] - x[t], or the second difference x[t+2p] - 2 x[t+p] + x[t] with detrend."""
    first = values[period:] - values[:-period]
    if not detrend:
        return first
    return first[period:] - first[:-period]


def _window_periods(
    values: np.ndarray, window: int, max_period: int, tolerance: float, detrend: bool
) -> np.ndarray:
    """Return the period of every window [w, w + window) of the series, 0 where none fits."""
    count = values.size - window + 1
    periods = np.zeros(count, dtype=np.int64)
    finite = np.isfinite(values).astype(np.int64)
    finite_windows = _sliding_sum(finite, window) == window

    for period in range(max_period, 0, -1):
        # Difference t starts at entry t, so window w uses differences w .. w + window - span - 1.
        differences = _differences(values, period, detrend)
        span = (_span(detrend) - 1) * period
        deviation = _sliding_max_abs(differences, window - span)
        periods[deviation <= tolerance] = period  # smaller periods overwrite larger ones
    periods[~finite_windows] = 0
    return periods


def _sliding_sum(values: np.ndarray, length: int) -> np.ndarray:
    cumulative = np.concatenate(([0], np.cumsum(values)))
    return cumulative[length:] - cumulative[:-length]


def _sliding_max_abs(differences: np.ndarray, length: int) -> np.ndarray:
    """Return max |d| over every run of `length` differences, chunked to bound memory."""
    count = differences.size - length + 1
    deviation = np.empty(count)
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        views = sliding_window_view(differences[start : stop + length - 1], length)
        with np.errstate(invalid="ignore"):
            deviation[start:stop] = np.abs(views).max(axis=1)
    return np.where(np.isfinite(deviation), deviation, np.inf)


def _runs(track: np.ndarray) -> list[tuple[int, int, int]]:
    """Split a track into runs of equal values: (value, start, length)."""
    if track.size == 0:
        return []
    boundaries = np.flatnonzero(np.diff(track)) + 1
    starts = np.concatenate(([0], boundaries))
    lengths = np.diff(np.concatenate((starts, [track.size])))
    return [(int(track[s]), int(s), int(n)) for s, n in zip(starts, lengths, strict=True)]


def _merge_runs(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Join consecutive kept runs of the same period (the flicker between them was dropped)."""
    merged: list[tuple[int, int, int]] = []
    for value, start, length in runs:
        if merged and merged[-1][0] == value:
            previous_value, previous_start, _ = merged[-1]
            merged[-1] = (previous_value, previous_start, start + length - previous_start)
        else:
            merged.append((value, start, length))
    return merged
