"""Build bifurcation diagrams: the values a series visits against a control parameter.

Within one run the control parameter is training time: the loss landscape changes slowly with
Gamma(t), so the values dF visits in each window trace its branches against the step. Across
runs the control parameter is a swept option (lr, amplitude), and each run contributes the values
of its final window.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from dynscope.analysis.periods import DEFAULT_RTOL, detect_period


def bifurcation_in_time(
    x: np.ndarray,
    steps: np.ndarray,
    window: int = 64,
    *,
    stride: int | None = None,
    name: str = "dF",
    units: str = "1",
) -> xr.Dataset:
    """Collect the values a series visits in each window of one run.

    Parameters
    ----------
    x : array_like, shape (n,)
        The series.
    steps : array_like of int, shape (n,)
        Step of each entry.
    window : int
        Entries per window.
    stride : int, optional
        Entries between window starts; default `window` (windows do not overlap).
    name, units : str
        Name and units of the series, stored as attributes.

    Returns
    -------
    xarray.Dataset
        `value(window, visit)` the window's values sorted ascending, so branches line up in
        the visit index; `window_step(window)` the middle step of each window; and
        `period(window)` from `detect_period`.
    """
    values = np.asarray(x, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.int64)
    if values.shape != steps.shape or values.ndim != 1:
        raise ValueError(
            f"series of shape {values.shape} and steps of shape {steps.shape} differ: pass one "
            "step per value"
        )
    if window < 2:
        raise ValueError(f"invalid window {window}: use at least 2 entries")
    stride = window if stride is None else stride
    if stride < 1:
        raise ValueError(f"invalid stride {stride}: use at least 1 entry")

    starts = np.arange(0, max(values.size - window + 1, 0), stride)
    visited = np.empty((starts.size, window))
    periods = np.empty(starts.size, dtype=np.int64)
    for index, start in enumerate(starts):
        segment = values[start : start + window]
        visited[index] = np.sort(segment)
        periods[index] = detect_period(segment, max_period=window // 2)
    middle_steps = steps[starts + window // 2] if starts.size else np.empty(0, dtype=np.int64)

    return xr.Dataset(
        {
            "value": (
                ("window", "visit"),
                visited,
                {"long_name": f"values of {name} visited in the window", "units": units},
            ),
            "window_step": (
                "window",
                middle_steps,
                {"long_name": "middle step of the window", "units": "step"},
            ),
            "period": (
                "window",
                periods,
                {"long_name": f"period of {name} in the window (0: none found)", "units": "step"},
            ),
        },
        attrs={"observable": name, "window": window, "stride": stride},
    )


def bifurcation_across_runs(
    final_windows: Sequence[np.ndarray],
    control_values: Sequence[float],
    control: str,
    *,
    max_period: int = 32,
    rtol: float | None = None,
    name: str = "dF",
    units: str = "1",
) -> xr.Dataset:
    """Collect each run's final-window values against a swept control parameter.

    Parameters
    ----------
    final_windows : sequence of array_like
        One 1-D window per run, of equal length (the last entries of the observable).
    control_values : sequence of float
        The swept parameter of each run.
    control : str
        Name of the parameter (for example "lr" or "amplitude").
    max_period : int
        Largest period tested in each window.
    rtol : float, optional
        As in `detect_period`.
    name, units : str
        Name and units of the observable.

    Returns
    -------
    xarray.Dataset
        Sorted by the control: `value(run, visit)`, `period(run)`, coordinate `control(run)`.
    """
    if len(final_windows) != len(control_values):
        raise ValueError(
            f"{len(final_windows)} windows and {len(control_values)} control values differ: "
            "pass one control value per run"
        )
    lengths = {np.size(w) for w in final_windows}
    if len(lengths) > 1:
        raise ValueError(f"final windows have lengths {sorted(lengths)}: cut them to one length")

    order = np.argsort(np.asarray(control_values, dtype=np.float64), kind="stable")
    windows = [np.asarray(final_windows[i], dtype=np.float64) for i in order]
    visited = np.array([np.sort(w) for w in windows]).reshape(len(windows), -1)
    periods = [detect_period(w, max_period, rtol) for w in windows]
    return xr.Dataset(
        {
            "value": (
                ("run", "visit"),
                visited,
                {"long_name": f"values of {name} in the final window", "units": units},
            ),
            "period": (
                "run",
                np.asarray(periods, dtype=np.int64),
                {"long_name": f"period of {name} in the final window (0: none found)"},
            ),
        },
        coords={
            control: (
                "run",
                np.asarray(control_values, dtype=np.float64)[order],
                {"long_name": f"swept parameter {control}"},
            )
        },
        attrs={
            "observable": name,
            "control": control,
            "rtol": DEFAULT_RTOL if rtol is None else rtol,
        },
    )
