"""Compose the analyses and figures of one record, or of a sweep of records, into a folder.

`analyze_record` writes ``summary.json``, ``analysis.nc`` (period track, bifurcation values,
per-cycle exploration and curvature) and the figures ``overview.png``, ``bifurcation.png`` and
``spectrum.png``. `analyze_runs` writes a bifurcation diagram across runs against a swept
option, and the sweep table of `dynscope.analysis.sweeps` (``sweep.nc``) with the figures that
fit the swept options: accuracy and lambda_max against width, a phase diagram over amplitude and
period, mean loss and lambda_max curves for each width and lr (``curves.nc``,
``mean_curves.png``).
Records without curvature probes or parameter snapshots still analyse; their ``curvature``,
``edge_of_stability`` and ``exploration`` sections are null and ``spectrum.png`` is not drawn.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from dynscope import plots
from dynscope.analysis.bifurcation import bifurcation_across_runs, bifurcation_in_time
from dynscope.analysis.exploration import exploration, step_alignment
from dynscope.analysis.periods import cascades_by_cycle, period_doubling_events, period_track
from dynscope.analysis.sharpness import curvature_reduction, longest_stretch_near_edge, sharpness
from dynscope.analysis.stability import edge_of_stability_lag, edge_of_stability_per_cycle
from dynscope.analysis.sweeps import mean_curves, record_configs, seed_statistics, sweep_table

logger = logging.getLogger(__name__)

DYNAMICAL_LOSSES = ("dce", "dmse1", "dmse2")
FLAT_ATTRIBUTES = ("loss", "lr", "amplitude", "period", "width", "depth", "seed", "dataset")


def analyze_record(
    record: str | Path | xr.Dataset,
    out_dir: str | Path,
    *,
    observable: str = "dF",
    window: int = 64,
    max_period: int = 16,
    rtol: float | None = None,
    min_duration: int = 32,
    max_gap: int = 128,
) -> dict[str, Any]:
    """Analyse one record and write the summary, the analysis file and the figures.

    Parameters
    ----------
    record : str, Path or xarray.Dataset
        A record path (opened with `dynscope.store.open_record`) or an opened record.
    out_dir : str or Path
        Folder for the outputs; created if missing.
    observable : str
        Series analysed for periods: "dF" (the one-step change of `loss`) or a per-step
        variable of the record.
    window, max_period, rtol : int, int, float
        Period track settings (see `period_track`).
    min_duration, max_gap : int
        Period doubling settings (see `period_doubling_events`).

    Returns
    -------
    dict
        The summary written to ``summary.json``.
    """
    dataset, source = _load(record)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    attributes = _flat_attributes(dataset)
    cycle_period = _cycle_period(attributes)

    steps, series = _observable(dataset, observable)
    track = period_track(series, window=window, max_period=max_period, rtol=rtol)
    events = period_doubling_events(track, steps, min_duration=min_duration, max_gap=max_gap)
    bifurcation = bifurcation_in_time(series, steps, window, name=observable)

    summary: dict[str, Any] = {
        "record": source,
        "status": dataset.attrs.get("status"),
        "config": attributes,
        "observable": observable,
        "steps": int(dataset.sizes.get("step", 0)),
        "loss_final": _last(dataset, "loss"),
        "period_doubling": [asdict(event) for event in events],
        "max_period": int(track.max()) if track.size else 0,
        "final_period": int(track[-1]) if track.size else 0,
        "cascades": None,
        "accuracy": {
            "train_final": _last(dataset, "train_accuracy"),
            "val_final": _last(dataset, "val_accuracy"),
        },
        "curvature": None,
        "edge_of_stability": None,
        "exploration": None,
    }
    if cycle_period is not None:
        cycles = cascades_by_cycle(
            track, steps, cycle_period, min_duration=min_duration, max_gap=max_gap
        )
        summary["cascades"] = [asdict(cycle) for cycle in cycles]

    bifurcation = bifurcation.rename({"value": "bifurcation_value", "period": "window_period"})
    parts = [_track_dataset(steps, series, track, observable), bifurcation]
    probes = _probes(dataset)
    if probes is not None:
        probe_steps, eigenvalues, trace, lr = probes
        result = sharpness(probe_steps, eigenvalues[:, 0], lr, trace=trace, period=cycle_period)
        summary["curvature"] = {
            "edge": result.edge_final,
            "lambda_max_final": result.lambda_max_final,
            "fraction_above_edge": result.fraction_above_edge,
            "first_crossing_step": result.first_crossing_step,
            "trace_final": result.trace_final,
            "lambda_max_cycle_end": result.lambda_max_cycle_end.tolist(),
            "near_edge": _near_edge(probe_steps, result.lambda_max, result.edge),
        }
        summary["edge_of_stability"] = _edge_of_stability(
            probe_steps, result.lambda_max, result.edge, track, steps, cycle_period,
            min_duration=min_duration, max_gap=max_gap,
        )  # fmt: skip
        parts.append(_curvature_dataset(result))

    snapshots = _snapshots(dataset)
    if snapshots is not None:
        snapshot_steps, params = snapshots
        measured = exploration(params, snapshot_steps, cycle_period)
        summary["exploration"] = {
            "path_length": measured.path_length,
            "displacement": measured.displacement,
            "effective_dimension": measured.effective_dimension,
            "path_length_per_cycle": measured.path_length_per_cycle.tolist(),
            "displacement_per_cycle": measured.displacement_per_cycle.tolist(),
        }
        parts.append(_exploration_dataset(measured, snapshot_steps))
        vectors_match = (
            "top_eigenvectors" in dataset
            and dataset["top_eigenvectors"].shape[-1] == params.shape[1]
        )
        if vectors_match and probes is not None:
            alignment = step_alignment(
                params, snapshot_steps, dataset["top_eigenvectors"].values, probes[0]
            )
            summary["exploration"]["mean_share_along_top"] = _nan_mean(alignment.along)

    analysis = xr.merge(parts, join="outer", combine_attrs="drop_conflicts")
    analysis.attrs = {"source": source, "observable": observable, "window": window}
    _write_atomically(out_dir / "analysis.nc", analysis.to_netcdf)
    summary["files"] = _draw_record_figures(dataset, out_dir, steps, series, probes)
    summary["files"].insert(0, "analysis.nc")
    summary["files"].insert(0, "summary.json")

    summary = _json_ready(summary)
    _write_text_atomically(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    logger.info("analysed %s into %s", source, out_dir)
    return summary


def analyze_runs(
    records: Sequence[str | Path | xr.Dataset],
    out_dir: str | Path,
    control: str | None = None,
    *,
    observable: str = "dF",
    window: int = 64,
    max_period: int = 32,
    rtol: float | None = None,
) -> dict[str, Any]:
    """Draw a bifurcation diagram across runs against a swept option, and tabulate the sweep.

    Each run contributes the last `window` values of the observable; `control` is read from the
    record attributes (or the config JSON). Without `control`, the diagram is drawn against lr
    when the records differ in lr, else against amplitude when they differ in amplitude, and
    not at all otherwise. Writes ``runs.nc`` and ``bifurcation_runs.png`` (with a diagram),
    ``sweep.nc`` (final values per run and their seed statistics, see `sweep_table`), the sweep
    figures that apply to the swept options and ``summary.json`` into `out_dir`, and returns
    the summary.
    """
    if not records:
        raise ValueError("no records given: pass at least one record path")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    loaded = [_load(record) for record in records]
    all_attributes = [_flat_attributes(dataset) for dataset, _ in loaded]
    if control is None:
        control = _default_control(all_attributes)
    runs: list[dict[str, Any]] = []
    windows = []
    for (dataset, source), attributes in zip(loaded, all_attributes, strict=True):
        value = attributes.get(control) if control is not None else None
        if control is not None and value is None:
            raise ValueError(
                f"record {source} has no option {control!r}: pass --control with an option the "
                "records were swept over (lr, amplitude, width ...)"
            )
        _, series = _observable(dataset, observable)
        final = np.full(window, np.nan)
        tail = series[-window:]
        final[window - tail.size :] = tail
        windows.append(final)
        probes = _probes(dataset)
        runs.append(
            {
                "name": source,
                "control_value": float(value) if value is not None else None,
                "status": dataset.attrs.get("status"),
                "loss_final": _last(dataset, "loss"),
                "lambda_max_final": float(probes[1][-1, 0]) if probes is not None else None,
                **attributes,
            }
        )

    # First, because it rejects records that do not form one grid before anything is written.
    sweep = _analyze_sweep(records, out_dir)
    files = ["summary.json"]
    if control is not None:
        _write_diagram_across_runs(
            runs, windows, control, out_dir, observable, window, max_period, rtol
        )
        files.extend(["runs.nc", "bifurcation_runs.png"])

    with_sharpness = [run for run in runs if run["lambda_max_final"] is not None]
    reductions = curvature_reduction(with_sharpness)
    summary = _json_ready(
        {
            "control": control,
            "observable": observable,
            "runs": runs,
            "curvature_reduction": [asdict(reduction) for reduction in reductions],
            "files": files,
        }
    )
    summary["files"].extend(sweep.pop("files"))
    summary["sweep"] = _json_ready(sweep)
    _write_text_atomically(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _default_control(all_attributes: list[dict[str, Any]]) -> str | None:
    """Return lr or amplitude, the first one whose value differs between runs, or None."""
    for option in ("lr", "amplitude"):
        if len({attributes.get(option) for attributes in all_attributes}) > 1:
            return option
    return None


def _write_diagram_across_runs(
    runs: list[dict[str, Any]],
    windows: list[np.ndarray],
    control: str,
    out_dir: Path,
    observable: str,
    window: int,
    max_period: int,
    rtol: float | None,
) -> None:
    """Write ``runs.nc`` and ``bifurcation_runs.png``; set each run's ``final_period``."""
    diagram = bifurcation_across_runs(
        windows,
        [run["control_value"] for run in runs],
        control,
        max_period=min(max_period, window // 2),
        rtol=rtol,
        name=observable,
    )
    for run, period in zip(runs, _periods_in_input_order(runs, diagram), strict=True):
        run["final_period"] = period
    _write_atomically(out_dir / "runs.nc", diagram.to_netcdf)
    plots.plot_bifurcation_across_runs(
        out_dir / "bifurcation_runs.png",
        diagram[control].values,
        diagram["value"].values,
        control=control,
        ylabel=observable,
    )


def _analyze_sweep(records: Sequence[str | Path | xr.Dataset], out_dir: Path) -> dict[str, Any]:
    """Write the sweep table and the figures that fit its swept options; return the summary."""
    table = sweep_table(records)
    statistics = seed_statistics(table)
    _write_atomically(out_dir / "sweep.nc", xr.merge([table, statistics]).to_netcdf)
    options = list(json.loads(table.attrs["sweep_dims"]))
    files = ["sweep.nc"]

    seeds = table.sizes["seed"]
    if "width" in options:
        rates = {config.get("lr") for config in record_configs(records)}
        rate = rates.pop() if len(rates) == 1 else None
        edge = 2.0 / float(rate) if rate else None
        files.extend(_draw_width_figures(statistics, out_dir, seeds, edge))
    if "amplitude" in options and "period" in options:
        files.extend(_draw_phase_diagrams(table, statistics, out_dir, seeds))
    if "width" in options and "lr" in options:
        curves = xr.merge(
            [mean_curves(records, name) for name in ("loss", "static_loss", "lambda_max")]
        )
        _write_atomically(out_dir / "curves.nc", curves.to_netcdf)
        files.extend(["curves.nc", _draw_mean_curves(curves, out_dir)])

    points = []
    for label, selection in _groups(statistics["final_val_accuracy_mean"], ()):
        point: dict[str, Any] = {"label": label, **selection}
        for name in ("final_val_accuracy", "final_lambda_max"):
            for statistic in ("mean", "std", "count"):
                point[f"{name}_{statistic}"] = (
                    statistics[f"{name}_{statistic}"].sel(selection).item()
                )
        points.append(point)
    return {"options": options, "seeds": table["seed"].values, "points": points, "files": files}


def _groups(data: xr.DataArray, keep: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """List the combinations of the dimensions not in `keep`: a label and a selection each."""
    others = [str(dim) for dim in data.dims if dim not in keep]
    groups = []
    for values in itertools.product(*(data[dim].values.tolist() for dim in others)):
        selection = dict(zip(others, values, strict=True))
        label = ", ".join(f"{dim}={_option_text(value)}" for dim, value in selection.items())
        groups.append((label, selection))
    return groups


def _option_text(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _draw_width_figures(
    statistics: xr.Dataset, out_dir: Path, seeds: int, edge: float | None
) -> list[str]:
    """Draw final val accuracy and final lambda_max against width, one line per other option.

    ``edge`` is 2/lr when every run has the same lr; the lambda_max figure marks it.
    """
    files = []
    figures = {
        "final_val_accuracy": ("accuracy_width.png", "final val accuracy"),
        "final_lambda_max": ("lambda_max_width.png", "final $\\lambda_{max}$"),
    }
    for name, (file_name, ylabel) in figures.items():
        mean = statistics[f"{name}_mean"]
        if not np.isfinite(mean.values).any():
            continue
        groups = _groups(mean, ("width",))
        plots.plot_against_width(
            out_dir / file_name,
            mean["width"].values,
            np.stack([mean.sel(selection).values for _, selection in groups]),
            np.stack([statistics[f"{name}_std"].sel(selection).values for _, selection in groups]),
            [label for label, _ in groups],
            ylabel=ylabel,
            title=f"mean over {seeds} seeds, band: +- std",
            edge=edge if name == "final_lambda_max" else None,
        )
        files.append(file_name)
    return files


def _draw_phase_diagrams(
    table: xr.Dataset, statistics: xr.Dataset, out_dir: Path, seeds: int
) -> list[str]:
    """Draw final val accuracy over amplitude and period, one figure per other option value."""
    files = []
    mean = statistics["final_val_accuracy_mean"]
    for label, selection in _groups(mean, ("amplitude", "period")):
        reference = None
        static = table["final_val_accuracy"].sel(selection)
        if 1.0 in static["amplitude"].values:
            finite = static.sel(amplitude=1.0).values
            finite = finite[np.isfinite(finite)]
            reference = float(finite.mean()) if finite.size else None
        suffix = "_".join(f"{dim}-{_option_text(value)}" for dim, value in selection.items())
        file_name = f"phase_diagram_{suffix}.png" if suffix else "phase_diagram.png"
        cells = mean.sel(selection).transpose("amplitude", "period")
        plots.plot_phase_diagram(
            out_dir / file_name,
            cells["amplitude"].values,
            cells["period"].values,
            cells.values,
            std=statistics["final_val_accuracy_std"]
            .sel(selection)
            .transpose("amplitude", "period")
            .values,
            reference=reference,
            title=f"final val accuracy, mean of {seeds} seeds" + (f" ({label})" if label else ""),
        )
        files.append(file_name)
    return files


def _draw_mean_curves(curves: xr.Dataset, out_dir: Path) -> str:
    """Draw the seed-mean loss and lambda_max against step, one line per grid point."""
    groups = _groups(curves["loss_mean"], ("step",))
    lambda_groups = [
        {dim: value for dim, value in selection.items() if dim in curves["lambda_max_mean"].dims}
        for _, selection in groups
    ]
    plots.plot_mean_curves(
        out_dir / "mean_curves.png",
        curves["step"].values,
        np.stack([curves["loss_mean"].sel(selection).values for _, selection in groups]),
        np.stack([curves["loss_std"].sel(selection).values for _, selection in groups]),
        curves["probe_step"].values,
        np.stack([curves["lambda_max_mean"].sel(selection).values for selection in lambda_groups]),
        np.stack([curves["lambda_max_std"].sel(selection).values for selection in lambda_groups]),
        [label for label, _ in groups],
        edges=[2.0 / lr for lr in curves["lr"].values.tolist()],
    )
    return "mean_curves.png"


def _near_edge(
    probe_steps: np.ndarray, lambda_max: np.ndarray, edge: np.ndarray
) -> dict[str, int] | None:
    stretch = longest_stretch_near_edge(probe_steps, lambda_max, edge, rtol=0.1)
    if stretch is None:
        return None
    return {"start_step": stretch.start_step, "end_step": stretch.end_step, "steps": stretch.steps}


def format_summary(summary: dict[str, Any]) -> str:
    """Format a summary from `analyze_record` or `analyze_runs` as a few lines of text."""
    if "runs" in summary:
        return _format_runs(summary)

    lines = [f"record: {summary.get('record')} ({summary.get('steps')} steps, "
             f"status {summary.get('status')})"]  # fmt: skip
    events = summary.get("period_doubling") or []
    if events:
        shown = ", ".join(
            f"{e['from_period']}->{e['to_period']} at {e['step']}" for e in events[:8]
        )
        more = f" (+{len(events) - 8} more)" if len(events) > 8 else ""
        lines.append(f"period doublings of {summary['observable']}: {shown}{more}")
    else:
        lines.append(f"period doublings of {summary['observable']}: none")
    lines.append(f"max period: {summary.get('max_period')}")

    accuracy = summary.get("accuracy") or {}
    lines.append(
        f"accuracy: train {_number(accuracy.get('train_final'))}, "
        f"val {_number(accuracy.get('val_final'))}"
    )
    curvature = summary.get("curvature")
    if curvature:
        crossing = curvature["first_crossing_step"]
        lines.append(
            f"lambda_max final {_number(curvature['lambda_max_final'])} vs 2/lr "
            f"{_number(curvature['edge'])}; above the edge at "
            f"{_number(100 * curvature['fraction_above_edge'], '.1f')}% of probes; "
            + (
                "never rises through it"
                if crossing is None
                else f"first rises through it at step {crossing}"
            )
        )
        near_edge = curvature.get("near_edge")
        if near_edge and near_edge["steps"] > 0:
            lines.append(
                f"lambda_max within 10% of 2/lr for {near_edge['steps']} steps "
                f"({near_edge['start_step']} to {near_edge['end_step']})"
            )
    stability = summary.get("edge_of_stability")
    if stability and stability.get("lag") is not None:
        lag = stability["lag"]
        onset, crossing_probe = stability["period2_step"], stability["crossing_step"]
        if lag >= 0:
            text = (
                f"{lag} steps after lambda_max rose through 2/lr (probe at step {crossing_probe})"
            )
        else:
            text = (
                f"between the probe below 2/lr and the probe at step {crossing_probe} that first "
                "saw lambda_max above it"
            )
        lines.append(f"edge of stability: period 2 starts at step {onset}, {text}")
    explored = summary.get("exploration")
    if explored:
        lines.append(
            f"exploration: path length {_number(explored['path_length'])}, displacement "
            f"{_number(explored['displacement'])}"
        )
    return "\n".join(lines)


def _format_runs(summary: dict[str, Any]) -> str:
    control = summary["control"]
    against = f" against {control}" if control is not None else ""
    lines = [f"{len(summary['runs'])} runs{against}:"]
    for run in summary["runs"]:
        position = ""
        if control is not None:
            # Period 0: no period up to the maximum fits the last window (aperiodic).
            period = run["final_period"] or "none (aperiodic)"
            position = f"{control}={_number(run['control_value'])}, final period {period}, "
        status = "" if run["status"] == "complete" else f" (status {run['status']})"
        lines.append(
            f"  {Path(run['name']).name}: {position}loss {_number(run['loss_final'])}, "
            f"lambda_max {_number(run['lambda_max_final'])}{status}"
        )
    for reduction in summary.get("curvature_reduction", []):
        lines.append(
            f"curvature reduction {Path(reduction['dynamical']).name} / "
            f"{Path(reduction['static']).name}: {_number(reduction['ratio'])}"
        )
    if summary.get("sweep"):
        lines.extend(_format_sweep(summary["sweep"]))
    return "\n".join(lines)


def _format_sweep(sweep: dict[str, Any]) -> list[str]:
    """Format the mean +- std (count) of final val accuracy and lambda_max per grid point."""
    options = sweep["options"]
    names = {"final_val_accuracy": "val accuracy", "final_lambda_max": "lambda_max"}
    # Without probes every lambda_max count is 0, so that column is left out.
    if not any(point["final_lambda_max_count"] for point in sweep["points"]):
        names.pop("final_lambda_max")
    header = [*options, *(f"{label} (mean +- std, n)" for label in names.values())]
    rows = []
    for point in sweep["points"]:
        row = [_option_text(point[option]) for option in options]
        for name in names:
            row.append(
                f"{_number(point[f'{name}_mean'])} +- {_number(point[f'{name}_std'])} "
                f"({point[f'{name}_count']})"
            )
        rows.append(row)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"sweep over {', '.join(options) or 'no option'}, {len(sweep['seeds'])} seeds:"]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _number(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "n/a"
    return format(value, spec)


def _load(record: str | Path | xr.Dataset) -> tuple[xr.Dataset, str]:
    if isinstance(record, xr.Dataset):
        return record, str(record.attrs.get("source", "dataset"))
    from dynscope.store import open_record  # imported here so the analyses work without a file

    return open_record(record), str(record)


def _flat_attributes(dataset: xr.Dataset) -> dict[str, Any]:
    """Read the flat options of a record, falling back to its config JSON."""
    config: dict[str, Any] = {}
    if "config" in dataset.attrs:
        try:
            config = json.loads(dataset.attrs["config"])
        except (TypeError, json.JSONDecodeError):
            logger.warning("record config attribute is not valid JSON; using flat attributes")
    values: dict[str, Any] = {}
    for name in set(FLAT_ATTRIBUTES) | set(config):
        value = dataset.attrs.get(name, config.get(name))
        if isinstance(value, np.generic):
            value = value.item()
        if value is not None:
            values[name] = value
    return dict(sorted(values.items()))


def _cycle_period(attributes: dict[str, Any]) -> int | None:
    """Return the oscillation period of a dynamical run, None for a static one."""
    dynamical = attributes.get("loss") in DYNAMICAL_LOSSES and attributes.get("amplitude", 1) > 1
    period = attributes.get("period")
    return int(period) if dynamical and period else None


def _observable(dataset: xr.Dataset, observable: str) -> tuple[np.ndarray, np.ndarray]:
    steps = dataset["step"].values.astype(np.int64)
    if observable == "dF":
        loss = dataset["loss"].values.astype(np.float64)
        return steps[1:], np.diff(loss)
    if observable not in dataset or dataset[observable].dims != ("step",):
        raise ValueError(
            f"unknown observable {observable!r}: use dF or a per-step variable such as loss"
        )
    return steps, dataset[observable].values.astype(np.float64)


def _probes(
    dataset: xr.Dataset,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Return probe steps, eigenvalues, trace and lr at the probes, or None without probes."""
    if "eigenvalues" not in dataset or dataset.sizes.get("probe", 0) == 0:
        return None
    probe_steps = dataset["probe_step"].values.astype(np.int64)
    eigenvalues = dataset["eigenvalues"].values.astype(np.float64)
    trace = (
        dataset["hessian_trace"].values.astype(np.float64)
        if "hessian_trace" in dataset
        else np.full(probe_steps.size, np.nan)
    )
    steps = dataset["step"].values
    lr_values = dataset["lr"].values.astype(np.float64)
    index = np.clip(np.searchsorted(steps, probe_steps), 0, steps.size - 1)
    return probe_steps, eigenvalues, trace, lr_values[index]


def _snapshots(dataset: xr.Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    if "params" not in dataset or dataset.sizes.get("snapshot", 0) == 0:
        return None
    return (
        dataset["snapshot_step"].values.astype(np.int64),
        dataset["params"].values.astype(np.float64),
    )


def _edge_of_stability(
    probe_steps: np.ndarray,
    lambda_max: np.ndarray,
    edge: np.ndarray,
    track: np.ndarray,
    steps: np.ndarray,
    cycle_period: int | None,
    *,
    min_duration: int,
    max_gap: int,
) -> dict[str, Any]:
    options = {"min_duration": min_duration, "max_gap": max_gap}
    overall = edge_of_stability_lag(probe_steps, lambda_max, edge, track, steps, **options)
    result: dict[str, Any] = asdict(overall)
    result.pop("cycle")
    if cycle_period is not None:
        per_cycle = edge_of_stability_per_cycle(
            probe_steps, lambda_max, edge, track, steps, cycle_period, **options
        )
        result["per_cycle"] = [asdict(item) for item in per_cycle]
    return result


def _track_dataset(
    steps: np.ndarray, series: np.ndarray, track: np.ndarray, observable: str
) -> xr.Dataset:
    return xr.Dataset(
        {
            "observable": (
                "step",
                series,
                {"long_name": f"observable {observable}", "units": "1"},
            ),
            "period": (
                "step",
                track,
                {"long_name": f"period of {observable} around the step (0: none)", "units": "step"},
            ),
        },
        coords={"step": ("step", steps, {"long_name": "training step", "units": "step"})},
    )


def _curvature_dataset(result: Any) -> xr.Dataset:
    variables: dict[str, Any] = {
        "lambda_max": (
            "probe",
            result.lambda_max,
            {"long_name": "top Hessian eigenvalue", "units": "1"},
        ),
        "edge": ("probe", result.edge, {"long_name": "edge of stability 2/lr", "units": "1"}),
        "probe_step": ("probe", result.probe_step, {"long_name": "probe step", "units": "step"}),
    }
    if result.cycles.size:
        variables["lambda_max_cycle_end"] = (
            "cycle",
            result.lambda_max_cycle_end,
            {"long_name": "top Hessian eigenvalue at the last probe of the cycle", "units": "1"},
        )
        variables["fraction_above_edge"] = (
            "cycle",
            result.fraction_above_edge_per_cycle,
            {"long_name": "fraction of the cycle's probes above 2/lr", "units": "1"},
        )
    return xr.Dataset(variables, coords=_cycle_coords(result.cycles))


def _exploration_dataset(measured: Any, snapshot_steps: np.ndarray) -> xr.Dataset:
    variables: dict[str, Any] = {
        "displacement": (
            "snapshot",
            measured.displacement_curve,
            {"long_name": "distance from the first snapshot ||theta_t - theta_0||", "units": "1"},
        ),
        "snapshot_step": (
            "snapshot",
            snapshot_steps,
            {"long_name": "snapshot step", "units": "step"},
        ),
    }
    if measured.cycles.size:
        variables["path_length_per_cycle"] = (
            "cycle",
            measured.path_length_per_cycle,
            {"long_name": "path length between snapshots inside the cycle", "units": "1"},
        )
        variables["displacement_per_cycle"] = (
            "cycle",
            measured.displacement_per_cycle,
            {"long_name": "distance between the cycle's first and last snapshot", "units": "1"},
        )
    return xr.Dataset(variables, coords=_cycle_coords(measured.cycles))


def _cycle_coords(cycles: np.ndarray) -> dict[str, Any]:
    if not cycles.size:
        return {}
    return {"cycle": ("cycle", cycles, {"long_name": "oscillation cycle index", "units": "1"})}


def _draw_record_figures(
    dataset: xr.Dataset,
    out_dir: Path,
    steps: np.ndarray,
    series: np.ndarray,
    probes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
) -> list[str]:
    record_steps = dataset["step"].values
    probe_steps = probes[0] if probes is not None else None
    lambda_max = probes[1][:, 0] if probes is not None else None
    edge = 2.0 / probes[3] if probes is not None else None
    plots.plot_overview(
        out_dir / "overview.png",
        record_steps,
        gamma=dataset["gamma"].values if "gamma" in dataset else None,
        loss=dataset["loss"].values,
        df=series,
        df_steps=steps,
        train_accuracy=_values(dataset, "train_accuracy"),
        val_accuracy=_values(dataset, "val_accuracy"),
        probe_steps=probe_steps,
        lambda_max=lambda_max,
        edge=edge,
    )
    plots.plot_bifurcation(out_dir / "bifurcation.png", steps, series)
    files = ["overview.png", "bifurcation.png"]
    if probes is not None:
        plots.plot_spectrum(out_dir / "spectrum.png", probes[0], probes[1], edge=edge)
        files.append("spectrum.png")
    return files


def _values(dataset: xr.Dataset, name: str) -> np.ndarray | None:
    return dataset[name].values if name in dataset else None


def _last(dataset: xr.Dataset, name: str) -> float | None:
    if name not in dataset or dataset[name].size == 0:
        return None
    return float(dataset[name].values[-1])


def _nan_mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _periods_in_input_order(runs: list[dict[str, Any]], diagram: xr.Dataset) -> list[int]:
    """Map the periods of the control-sorted diagram back to the order of `runs`."""
    order = np.argsort([run["control_value"] for run in runs], kind="stable")
    periods = np.empty(len(runs), dtype=np.int64)
    periods[order] = diagram["period"].values
    return [int(p) for p in periods]


def _json_ready(value: Any) -> Any:
    """Convert numpy scalars to Python numbers and NaN or infinity to None, recursively."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file through a temporary name and rename it into place.

    A write that fails (a full disk, an interrupt) then leaves the previous file or none, never
    a truncated one.
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _write_text_atomically(path: Path, text: str) -> None:
    """Write a text file as `_write_atomically` does."""
    _write_atomically(path, lambda partial: partial.write_text(text))
