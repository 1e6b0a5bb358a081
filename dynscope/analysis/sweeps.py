"""Tabulate a sweep of records by its swept options: final values, seed statistics, mean curves.

A sweep is a set of records whose configs differ in some options (read from each record's
``config`` attribute). Every scalar option whose value differs between the records becomes a
dimension named after the option (``width``, ``lr``, ``loss``, ...), with the sorted distinct
values as coordinates, except ``seed``, which is always the last dimension and numbers the
replicates. A record without a seed option counts as seed 0. Grid points without a record hold
NaN, so a sweep with a failed run still tabulates.

`sweep_table` gives the final values of every run, `seed_statistics` their mean, standard
deviation and count over seeds, and `mean_curves` the seed mean of a per-step curve (or of
lambda_max at the probes) at every grid point.

Records are opened lazily through `dynscope.store.open_records` and only the variables needed
are read, so a sweep of large records (snapshots, eigenvectors) costs little memory.

Limits: the grid is the product of the distinct values of each swept option, so records that
differ in two options jointly (never in a full grid) leave many NaN cells; two records with the
same swept options and seed raise ValueError.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from dynscope import store

logger = logging.getLogger(__name__)

Record = str | os.PathLike[str] | xr.Dataset

SEED = "seed"
"""Option (and dimension) that numbers the replicates of one grid point."""

STEP_VARIABLES = (
    "loss",
    "static_loss",
    "train_accuracy",
    "val_accuracy",
    "grad_norm",
    "minibatch_loss",
    "lr",
)
"""Per-step variables of a record that `mean_curves` accepts besides ``lambda_max``."""

LAMBDA_MAX = "lambda_max"

FINAL_VALUES = {
    "final_loss": ("loss", "loss minimised at the last recorded step"),
    "final_static_loss": ("static_loss", "static counterpart of the loss at the last step"),
    "final_train_accuracy": ("train_accuracy", "training accuracy at the last recorded step"),
    "final_val_accuracy": ("val_accuracy", "validation accuracy at the last recorded step"),
    "final_lambda_max": (LAMBDA_MAX, "top Hessian eigenvalue at the last probe (NaN: no probes)"),
}
"""Variables of `sweep_table`: name to (record variable, long name)."""

OPTION_UNITS = {
    "steps": "step",
    "period": "step",
    "static_tail": "step",
    "hessian_every": "step",
    "snapshot_every": "step",
    "flush_every": "step",
}
"""Units of the swept options counted in steps; every other numeric option has units "1"."""


@dataclass(frozen=True)
class _Run:
    """One record of the sweep: where it comes from, its config and status."""

    record: Record
    source: str
    config: dict[str, Any]
    status: str


@dataclass(frozen=True)
class _Grid:
    """The swept options, their values and the grid position of every run."""

    options: tuple[str, ...]
    values: dict[str, list[Any]]
    positions: tuple[tuple[int, ...], ...]

    @property
    def dims(self) -> tuple[str, ...]:
        return (*self.options, SEED)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.values[dim]) for dim in self.dims)

    def coords(self) -> dict[str, xr.DataArray]:
        coords = {}
        for dim in self.dims:
            values = np.asarray(self.values[dim])
            attrs = {"long_name": f"swept option {dim}"}
            if dim == SEED:
                attrs["long_name"] = "seed of the run (replicate)"
            if values.dtype.kind in "iuf":
                attrs["units"] = OPTION_UNITS.get(dim, "1")
            coords[dim] = xr.DataArray(values, dims=dim, attrs=attrs)
        return coords


def sweep_table(records: Sequence[Record]) -> xr.Dataset:
    """Tabulate the final values of every run of a sweep along its swept options and seed.

    Parameters
    ----------
    records
        Record paths, or opened records (xarray Datasets with a ``config`` attribute).

    Returns
    -------
    xarray.Dataset
        Dimensions: the swept options in config order, then ``seed``. Variables
        ``final_loss``, ``final_static_loss``, ``final_train_accuracy``,
        ``final_val_accuracy`` (values at the last recorded step), ``final_lambda_max``
        (``eigenvalues[probe=-1, eig=0]``, NaN without probes), ``final_step`` (last recorded
        step), ``status`` ("missing" where no record exists) and ``source`` (the record path).
        The attribute ``sweep_dims`` maps each dimension to its option as JSON.

    Raises
    ------
    ValueError
        If no record is given or two records share the same swept options and seed.
    """
    runs = _headers(records)
    grid = _grid(runs)

    finals = {name: np.full(grid.shape, np.nan) for name in FINAL_VALUES}
    final_step = np.full(grid.shape, np.nan)
    status = np.full(grid.shape, "missing", dtype=object)
    source = np.full(grid.shape, "", dtype=object)
    names = [variable for variable, _ in FINAL_VALUES.values()]
    for run, position, dataset in _read_runs(runs, grid, names):
        for name, (variable, _) in FINAL_VALUES.items():
            finals[name][position] = _final_value(dataset, variable)
        if dataset.sizes.get("step", 0):
            final_step[position] = float(dataset["step"].values[-1])
        status[position] = run.status
        source[position] = run.source

    variables: dict[str, xr.DataArray] = {}
    for name, (_, long_name) in FINAL_VALUES.items():
        variables[name] = xr.DataArray(
            finals[name], dims=grid.dims, attrs={"long_name": long_name, "units": "1"}
        )
    variables["final_step"] = xr.DataArray(
        final_step, dims=grid.dims, attrs={"long_name": "last recorded step", "units": "step"}
    )
    variables["status"] = xr.DataArray(
        status.astype(str), dims=grid.dims, attrs={"long_name": "final status of the record"}
    )
    variables["source"] = xr.DataArray(
        source.astype(str), dims=grid.dims, attrs={"long_name": "path of the record"}
    )
    return xr.Dataset(variables, coords=grid.coords(), attrs=_attrs(grid))


def seed_statistics(table: xr.Dataset) -> xr.Dataset:
    """Reduce the numeric variables of a sweep table over seeds: mean, std and count.

    Non-finite values (missing runs, a NaN or infinite final loss) are left out. The standard
    deviation is the sample one (``ddof=1``), so a grid point with one finite value has std NaN.

    Parameters
    ----------
    table
        The result of `sweep_table` (any Dataset with a ``seed`` dimension works).

    Returns
    -------
    xarray.Dataset
        For each numeric variable ``X`` of the table with a ``seed`` dimension: ``X_mean``,
        ``X_std`` and ``X_count`` (number of finite values), along the other dimensions.

    Raises
    ------
    ValueError
        If the table has no ``seed`` dimension.
    """
    if SEED not in table.dims:
        raise ValueError(
            f"table has no {SEED!r} dimension (dims: {list(table.dims)}); pass a sweep_table result"
        )
    variables: dict[str, xr.DataArray] = {}
    for name, values in table.data_vars.items():
        if SEED not in values.dims or values.dtype.kind not in "iuf":
            continue
        mean, std, count = _moments(values.astype(np.float64), SEED)
        long_name = values.attrs.get("long_name", str(name))
        units = values.attrs.get("units", "1")
        mean.attrs = {"long_name": f"mean over seeds of the {long_name}", "units": units}
        std.attrs = {
            "long_name": f"standard deviation over seeds of the {long_name}",
            "units": units,
        }
        count.attrs = {"long_name": f"number of seeds with a finite {long_name}", "units": "1"}
        variables[f"{name}_mean"] = mean
        variables[f"{name}_std"] = std
        variables[f"{name}_count"] = count
    statistics = xr.Dataset(variables)
    statistics.attrs = {key: value for key, value in table.attrs.items() if key == "sweep_dims"}
    return statistics


def mean_curves(records: Sequence[Record], variable: str) -> xr.Dataset:
    """Average a curve of every run over seeds at each grid point of a sweep.

    Parameters
    ----------
    records
        Record paths, or opened records (xarray Datasets with a ``config`` attribute).
    variable
        A per-step variable (``loss``, ``static_loss``, ``val_accuracy``, ...), indexed by
        ``step``, or ``lambda_max`` (``eigenvalues[:, 0]``), indexed by ``probe_step``.

    Returns
    -------
    xarray.Dataset
        ``<variable>_mean``, ``<variable>_std`` (sample std, ``ddof=1``) and
        ``<variable>_count`` along the swept options (seed excluded) and ``step`` or
        ``probe_step``, whose coordinate is the union of the runs' steps. Runs that stop early
        (diverged, interrupted) leave NaN after their last step; non-finite values are left
        out of the statistics and ``count`` gives the number of seeds that entered each step.

    Raises
    ------
    ValueError
        If the variable is not a curve of a record or no record is given.
    """
    if variable != LAMBDA_MAX and variable not in STEP_VARIABLES:
        raise ValueError(
            f"unknown curve {variable!r}: use {LAMBDA_MAX} or a per-step variable "
            f"({', '.join(STEP_VARIABLES)})"
        )
    runs = _headers(records)
    grid = _grid(runs)
    step_dim = "probe_step" if variable == LAMBDA_MAX else "step"

    curves: list[tuple[tuple[int, ...], np.ndarray, np.ndarray]] = []
    long_name = "top Hessian eigenvalue" if variable == LAMBDA_MAX else variable
    for _, position, dataset in _read_runs(runs, grid, [variable]):
        steps, values = _curve(dataset, variable)
        curves.append((position, steps, values))
        if variable in dataset:
            long_name = str(dataset[variable].attrs.get("long_name", long_name))

    all_steps = np.unique(np.concatenate([steps for _, steps, _ in curves]).astype(np.int64))
    table = np.full((*grid.shape, all_steps.size), np.nan)
    for position, steps, values in curves:
        table[position][np.searchsorted(all_steps, steps)] = values

    step_long_name = "training step of the probe" if variable == LAMBDA_MAX else "training step"
    coords: dict[str, xr.DataArray] = grid.coords()
    coords[step_dim] = xr.DataArray(
        all_steps, dims=step_dim, attrs={"long_name": step_long_name, "units": "step"}
    )
    curve = xr.DataArray(table, dims=(*grid.dims, step_dim), coords=coords)
    mean, std, count = _moments(curve, SEED)
    mean.attrs = {"long_name": f"mean over seeds of the {long_name}", "units": "1"}
    std.attrs = {"long_name": f"standard deviation over seeds of the {long_name}", "units": "1"}
    count.attrs = {"long_name": f"number of seeds with a finite {long_name}", "units": "1"}
    dataset = xr.Dataset(
        {f"{variable}_mean": mean, f"{variable}_std": std, f"{variable}_count": count}
    )
    dataset.attrs = _attrs(grid)
    return dataset


def record_configs(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Return the stored options of each record, read without loading its data."""
    return [run.config for run in _headers(records)]


def _headers(records: Sequence[Record]) -> list[_Run]:
    """Read the config and status of every record without loading its data."""
    if isinstance(records, (str, os.PathLike, xr.Dataset)):
        raise ValueError("records must be a sequence of records: wrap a single record in a list")
    if not records:
        raise ValueError("no records given: pass the paths of the sweep's records")
    runs = []
    for index, record in enumerate(records):
        if isinstance(record, xr.Dataset):
            config = json.loads(str(record.attrs.get("config", "{}")))
            source = str(record.attrs.get("source", f"dataset {index}"))
            runs.append(_Run(record, source, config, str(record.attrs.get("status", ""))))
        else:
            info = store.record_info(record)
            runs.append(_Run(record, os.fspath(record), info.config, info.status))
    return runs


def _grid(runs: list[_Run]) -> _Grid:
    """Place each run on the grid of the options that differ between runs."""
    configs = [run.config for run in runs]
    options = tuple(option for option in store.differing_options(configs) if option != SEED)
    values: dict[str, list[Any]] = {}
    for option in options:
        values[option] = sorted({config[option] for config in configs})
    values[SEED] = sorted({int(config.get(SEED, 0)) for config in configs})

    positions = []
    occupied: dict[tuple[int, ...], str] = {}
    for run in runs:
        position = tuple(values[option].index(run.config[option]) for option in options)
        position += (values[SEED].index(int(run.config.get(SEED, 0))),)
        if position in occupied:
            raise ValueError(
                f"records {occupied[position]} and {run.source} have the same swept options and "
                "seed: remove one of them from the sweep"
            )
        occupied[position] = run.source
        positions.append(position)

    cells = math.prod(len(values[option]) for option in options)
    filled = len({position[:-1] for position in positions})
    if 2 * filled < cells:
        raise ValueError(
            f"the records do not form one grid: they differ in {', '.join(options)}, and only "
            f"{filled} of those {cells} combinations have records; analyse the records of each "
            "study on their own"
        )
    return _Grid(options, values, tuple(positions))


def _read_runs(
    runs: list[_Run], grid: _Grid, names: list[str]
) -> Iterator[tuple[_Run, tuple[int, ...], xr.Dataset]]:
    """Yield each run with its grid position and a lazy view of the record variables needed."""
    wanted = set(names)
    if LAMBDA_MAX in wanted:
        wanted |= {"eigenvalues", "probe_step"}
    for run, position in zip(runs, grid.positions, strict=True):
        if isinstance(run.record, xr.Dataset):
            dataset = run.record
            opened = False
        else:
            dataset = store.open_records([run.record])
            opened = True
        present = [name for name in sorted(wanted) if name in dataset.data_vars]
        yield run, position, dataset[present]
        if opened:
            dataset.close()


def _final_value(dataset: xr.Dataset, variable: str) -> float:
    """Return a variable's value at the last step (lambda_max: at the last probe), or NaN."""
    if variable == LAMBDA_MAX:
        if "eigenvalues" not in dataset or dataset["eigenvalues"].size == 0:
            return float("nan")
        return float(dataset["eigenvalues"].isel(probe=-1, eig=0).values)
    if variable not in dataset or dataset[variable].size == 0:
        return float("nan")
    return float(dataset[variable].isel(step=-1).values)


def _curve(dataset: xr.Dataset, variable: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the steps and values of a run's curve (empty when the record lacks it)."""
    if variable == LAMBDA_MAX:
        if "eigenvalues" not in dataset or "probe_step" not in dataset:
            return np.empty(0, dtype=np.int64), np.empty(0)
        steps = dataset["probe_step"].values.astype(np.int64)
        return steps, dataset["eigenvalues"].isel(eig=0).values.astype(np.float64)
    if variable not in dataset:
        return np.empty(0, dtype=np.int64), np.empty(0)
    return dataset["step"].values.astype(np.int64), dataset[variable].values.astype(np.float64)


def _moments(values: xr.DataArray, dim: str) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Return the mean, sample std and count of the finite values along `dim`."""
    finite = xr.apply_ufunc(np.isfinite, values)
    count = finite.sum(dim)
    total = values.where(finite, 0.0).sum(dim)
    mean = total / count.where(count > 0)
    squares = ((values - mean) ** 2).where(finite, 0.0).sum(dim)
    std = (squares / (count - 1).where(count > 1)) ** 0.5
    return mean, std, count.astype(np.int64)


def _attrs(grid: _Grid) -> dict[str, str]:
    return {
        "sweep_dims": json.dumps({option: option for option in grid.options}),
        "replicate_dim": SEED,
    }
