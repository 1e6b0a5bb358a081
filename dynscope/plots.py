"""Draw the figures of an analysis with matplotlib (Agg backend, files only).

Every function takes numpy arrays, writes one file and closes its figure, so a sweep of hundreds of
runs does not accumulate open figures. This module imports no other dynscope module.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

logger = logging.getLogger(__name__)

TOP_COLOURED = 5
"""Eigenvalue trajectories drawn in colour in the spectrum figure; the rest are grey."""


ROBUST_PERCENTILE = 0.5
"""Percentile cut at each end when choosing the y-range of a scatter of dF."""


def _set_robust_limits(axis: plt.Axes, values: np.ndarray) -> None:
    """Fit the y-range to the central 99% of the values, so a few outliers (the large jumps
    where a period ends) do not flatten the period-doubling branches; the outliers fall off the
    plot and the count is written in the corner."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size < 10:
        return
    low, high = np.percentile(finite, [ROBUST_PERCENTILE, 100 - ROBUST_PERCENTILE])
    margin = 0.25 * (high - low) if high > low else max(abs(high), 1e-12)
    low, high = low - margin, high + margin
    outside = int(np.count_nonzero((finite < low) | (finite > high)))
    axis.set_ylim(low, high)
    if outside:
        axis.text(
            0.99, 0.02, f"{outside} points outside", transform=axis.transAxes,
            ha="right", va="bottom", fontsize=6, color="0.4",
        )  # fmt: skip


def plot_overview(
    path: str | Path,
    steps: np.ndarray,
    *,
    gamma: np.ndarray | None = None,
    loss: np.ndarray | None = None,
    df: np.ndarray | None = None,
    df_steps: np.ndarray | None = None,
    train_accuracy: np.ndarray | None = None,
    val_accuracy: np.ndarray | None = None,
    probe_steps: np.ndarray | None = None,
    lambda_max: np.ndarray | None = None,
    edge: float | np.ndarray | None = None,
) -> Path:
    """Draw Gamma_i, loss (log scale), dF, accuracies and lambda_max as stacked panels.

    Panels whose data are None are left out. `edge` (2/lr) is drawn dashed on the lambda_max
    panel. Returns the path written.
    """
    panels = []
    if gamma is not None:
        panels.append("gamma")
    if loss is not None:
        panels.append("loss")
    if df is not None:
        panels.append("df")
    if train_accuracy is not None or val_accuracy is not None:
        panels.append("accuracy")
    if lambda_max is not None and probe_steps is not None:
        panels.append("sharpness")
    if not panels:
        raise ValueError("nothing to plot: pass at least one series to plot_overview")

    figure, axes = plt.subplots(
        len(panels), 1, sharex=True, figsize=(8, 1.8 * len(panels) + 0.6), squeeze=False
    )
    for axis, panel in zip(axes[:, 0], panels, strict=True):
        if panel == "gamma" and gamma is not None:
            gamma = np.asarray(gamma)
            for label in range(gamma.shape[1]):
                axis.plot(steps, gamma[:, label], lw=0.8, label=f"class {label}")
            axis.set_ylabel(r"$\Gamma_i$")
            axis.legend(fontsize=6, loc="upper right")
        elif panel == "loss" and loss is not None:
            axis.semilogy(steps, np.where(np.asarray(loss) > 0, loss, np.nan), lw=0.8)
            axis.set_ylabel("loss")
        elif panel == "df" and df is not None:
            x = steps[1:] if df_steps is None else df_steps
            axis.plot(x, df, ",", color="k")
            _set_robust_limits(axis, df)
            axis.set_ylabel(r"$\Delta F$")
        elif panel == "accuracy":
            if train_accuracy is not None:
                axis.plot(steps, train_accuracy, lw=0.8, label="train")
            if val_accuracy is not None:
                axis.plot(steps, val_accuracy, lw=0.8, label="val")
            axis.set_ylabel("accuracy")
            axis.legend(fontsize=6, loc="lower right")
        elif panel == "sharpness" and lambda_max is not None and probe_steps is not None:
            axis.plot(probe_steps, lambda_max, lw=0.8, label=r"$\lambda_{max}$")
            if edge is not None:
                edge_values = np.broadcast_to(np.asarray(edge, dtype=float), np.shape(probe_steps))
                axis.plot(probe_steps, edge_values, "k--", lw=0.8, label="2/lr")
            axis.set_ylabel(r"$\lambda_{max}$")
            axis.legend(fontsize=6, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    return _save(figure, path)


def plot_bifurcation(
    path: str | Path, steps: np.ndarray, values: np.ndarray, *, ylabel: str = r"$\Delta F$"
) -> Path:
    """Draw a series against step with tiny markers, so period-doubling branches show."""
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.plot(steps, values, ",", color="k", alpha=0.6)
    _set_robust_limits(axis, values)
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    return _save(figure, path)


def plot_spectrum(
    path: str | Path,
    probe_steps: np.ndarray,
    eigenvalues: np.ndarray,
    *,
    edge: float | np.ndarray | None = None,
    top: int = TOP_COLOURED,
) -> Path:
    """Draw eigenvalue trajectories: the `top` largest in colour, the bulk grey, 2/lr dashed.

    `eigenvalues` has shape (probe, eig), sorted descending along eig.
    """
    eigenvalues = np.asarray(eigenvalues, dtype=float)
    figure, axis = plt.subplots(figsize=(8, 4))
    for index in range(eigenvalues.shape[1] - 1, top - 1, -1):
        axis.plot(probe_steps, eigenvalues[:, index], color="0.75", lw=0.4)
    for index in range(min(top, eigenvalues.shape[1])):
        axis.plot(probe_steps, eigenvalues[:, index], lw=1.0, label=rf"$\lambda_{index + 1}$")
    if edge is not None:
        edge_values = np.broadcast_to(np.asarray(edge, dtype=float), np.shape(probe_steps))
        axis.plot(probe_steps, edge_values, "k--", lw=0.8, label="2/lr")
    axis.set_xlabel("step")
    axis.set_ylabel("Hessian eigenvalue")
    axis.legend(fontsize=6, loc="upper right")
    return _save(figure, path)


def plot_bifurcation_across_runs(
    path: str | Path,
    control_values: np.ndarray,
    values: np.ndarray,
    *,
    control: str = "control",
    ylabel: str = r"$\Delta F$",
) -> Path:
    """Draw each run's final-window values (rows of `values`) against its control value."""
    values = np.asarray(values, dtype=float)
    repeated = np.repeat(np.asarray(control_values, dtype=float), values.shape[1])
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(repeated, values.ravel(), ".", color="k", markersize=1.5)
    axis.set_xlabel(control)
    axis.set_ylabel(ylabel)
    return _save(figure, path)


def _save(figure: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
    logger.debug("wrote %s", path)
    return path
