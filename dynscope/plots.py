"""Draw the figures of an analysis with matplotlib (Agg backend, files only).

Every function takes numpy arrays, writes one file and closes its figure, so a sweep of hundreds of
runs does not accumulate open figures. This module imports no other dynscope module.
"""

from __future__ import annotations

import logging
import os
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
    """Fit the y-range to the central 99% of the values.

    A few outliers (the large jumps where a period ends) would otherwise flatten the
    period-doubling branches. The outliers fall off the plot and their count is written in the
    corner.
    """
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


def plot_against_width(
    path: str | Path,
    widths: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    labels: list[str],
    *,
    ylabel: str,
    title: str | None = None,
    edge: float | None = None,
) -> Path:
    """Draw one line per group (a loss) of a value against width, with a +- std band.

    `mean` and `std` have shape (group, width); a NaN std draws no band at that width. The x
    axis is logarithmic in base 2 with a tick at each width. `edge`, when given, is the edge of
    stability 2/lr, drawn as a dashed horizontal line.
    """
    widths = np.asarray(widths, dtype=float)
    mean = np.atleast_2d(np.asarray(mean, dtype=float))
    std = np.atleast_2d(np.asarray(std, dtype=float))
    figure, axis = plt.subplots(figsize=(6, 4))
    for row, label in enumerate(labels):
        line = axis.plot(widths, mean[row], "o-", lw=1.2, markersize=4, label=label)[0]
        band = np.nan_to_num(std[row])
        axis.fill_between(
            widths, mean[row] - band, mean[row] + band, color=line.get_color(), alpha=0.2, lw=0
        )
    if edge is not None:
        axis.axhline(edge, color="0.4", ls="--", lw=1, label=f"2/lr = {edge:g}")
    axis.set_xscale("log", base=2)
    axis.set_xticks(widths, [f"{width:g}" for width in widths])
    axis.set_xlabel("width")
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title, fontsize=9)
    if len(labels) > 1 or labels[0] or edge is not None:
        axis.legend(fontsize=7)
    return _save(figure, path)


def plot_mean_curves(
    path: str | Path,
    steps: np.ndarray,
    loss_mean: np.ndarray,
    loss_std: np.ndarray,
    probe_steps: np.ndarray,
    lambda_mean: np.ndarray,
    lambda_std: np.ndarray,
    labels: list[str],
    *,
    edges: list[float] | None = None,
) -> Path:
    """Draw the seed-mean loss (log scale) and lambda_max against step, one line per group.

    `loss_mean` and `loss_std` have shape (group, step), `lambda_mean` and `lambda_std` shape
    (group, probe). Each line has a +- std band; `edges` (values of 2/lr) are drawn as dashed
    horizontal lines on the lambda_max panel, which is logarithmic when every mean is positive.
    A panel without finite values is left empty.
    """
    figure, (loss_axis, lambda_axis) = plt.subplots(2, 1, sharex=True, figsize=(8, 6.5))
    loss_mean = np.atleast_2d(np.asarray(loss_mean, dtype=float))
    loss_std = np.atleast_2d(np.asarray(loss_std, dtype=float))
    lambda_mean = np.atleast_2d(np.asarray(lambda_mean, dtype=float))
    lambda_std = np.atleast_2d(np.asarray(lambda_std, dtype=float))
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    for row, label in enumerate(labels):
        colour = colours(row % colours.N)
        _band(loss_axis, steps, loss_mean[row], loss_std[row], colour, label, positive=True)
        if lambda_mean.shape[1]:
            _band(lambda_axis, probe_steps, lambda_mean[row], lambda_std[row], colour, label)
    loss_axis.set_yscale("log")
    loss_axis.set_ylabel("mean loss")
    loss_axis.legend(fontsize=6, ncol=2)
    for edge in sorted(set(edges or [])):
        lambda_axis.axhline(edge, color="k", ls="--", lw=0.8)
        lambda_axis.annotate(
            f"2/lr = {edge:g}", (1.0, edge), xycoords=("axes fraction", "data"),
            ha="right", va="bottom", fontsize=7,
        )  # fmt: skip
    finite = lambda_mean[np.isfinite(lambda_mean)]
    if finite.size and finite.min() > 0:
        # Log scale, so that curves under a small lr stay readable next to a large 2/lr line.
        lambda_axis.set_yscale("log")
    lambda_axis.set_ylabel(r"mean $\lambda_{max}$")
    lambda_axis.set_xlabel("step")
    return _save(figure, path)


def _band(
    axis: plt.Axes,
    x: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    colour: object,
    label: str,
    *,
    positive: bool = False,
) -> None:
    """Draw a line with a +- std band; `positive` clips the band's lower edge for a log axis."""
    axis.plot(x, mean, color=colour, lw=1.0, label=label)
    band = np.nan_to_num(std)
    lower = mean - band
    if positive:
        lower = np.where(lower > 0, lower, np.nan)
    axis.fill_between(x, lower, mean + band, color=colour, alpha=0.2, lw=0)


def plot_phase_diagram(
    path: str | Path,
    amplitudes: np.ndarray,
    periods: np.ndarray,
    values: np.ndarray,
    *,
    std: np.ndarray | None = None,
    reference: float | None = None,
    label: str = "final val accuracy",
    title: str | None = None,
) -> Path:
    """Draw a value over amplitude (rows) and period (columns) as coloured cells with numbers.

    `values` (and `std`, written under each value) have shape (amplitude, period). `reference`,
    the value of the static loss (amplitude 1), is written in the title.
    """
    values = np.asarray(values, dtype=float)
    figure, axis = plt.subplots(figsize=(1.3 * len(periods) + 2.5, 0.8 * len(amplitudes) + 1.8))
    image = axis.imshow(values, origin="lower", cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axis, label=label)
    axis.set_xticks(np.arange(len(periods)), [f"{period:g}" for period in periods])
    axis.set_yticks(np.arange(len(amplitudes)), [f"{amplitude:g}" for amplitude in amplitudes])
    axis.set_xlabel("period T (steps)")
    axis.set_ylabel("amplitude A")

    finite = values[np.isfinite(values)]
    middle = 0.5 * (finite.min() + finite.max()) if finite.size else 0.0
    for row in range(values.shape[0]):
        for column in range(values.shape[1]):
            value = values[row, column]
            text = "n/a" if not np.isfinite(value) else f"{value:.3f}"
            if std is not None and np.isfinite(std[row, column]):
                text += f"\n\u00b1{std[row, column]:.3f}"
            colour = "k" if np.isfinite(value) and value > middle else "w"
            axis.text(column, row, text, ha="center", va="center", fontsize=7, color=colour)

    heading = title or label
    if reference is not None and np.isfinite(reference):
        heading += f"; static loss (A = 1): {reference:.3f}"
    axis.set_title(heading, fontsize=9)
    return _save(figure, path)


def _save(figure: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    figure.tight_layout()
    # Through a temporary name, so that a failed write never leaves a truncated figure.
    partial = path.with_name(f".{path.name}.partial")
    try:
        figure.savefig(partial, dpi=150, format=path.suffix.lstrip(".") or "png")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        plt.close(figure)
    logger.debug("wrote %s", path)
    return path
