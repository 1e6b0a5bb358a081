"""Read records: `open_record`, `open_records` and `record_info`.

The file format and its guarantees are described in `dynscope.store`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from dynscope import _journal, _ncfile
from dynscope._ncfile import SCHEMA, UNLIMITED_DIMS, RecordError

__all__ = ["RecordInfo", "open_record", "open_records", "record_info"]

logger = logging.getLogger("dynscope.store")

INDEX_VARIABLES = {"step": "step", "probe": "probe_step", "snapshot": "snapshot_step"}
RESUMABLE_STATUSES = ("running", "interrupted")
# Dimensions without a coordinate in a record; open_records numbers them so that records of
# different lengths align and pad with NaN.
NUMBERED_DIMS = ("probe", "snapshot", "param", "eig", "eigenvector", "ntk")


@dataclass(frozen=True)
class RecordInfo:
    """A summary of one record, read without loading its data.

    ``variable_bytes`` is the uncompressed size of each variable (what it takes in memory);
    ``last_step`` is None for a record without steps.
    """

    path: str
    status: str
    last_step: int | None
    num_steps: int
    num_probes: int
    num_snapshots: int
    can_resume: bool
    file_bytes: int
    journal_bytes: int
    variable_bytes: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def open_record(path: str | os.PathLike[str]) -> xr.Dataset:
    """Open one record, with every flushed row, as an in-memory xarray Dataset.

    The netCDF file is closed before this returns, so it never blocks a writer.

    Raises
    ------
    RecordError
        If the file is missing, truncated, not netCDF4, or not a dynscope record.
    """
    path = os.fspath(path)
    # The journal is read before the netCDF file so that a compaction in between is harmless.
    journal = _read_journal(path)
    contents = _ncfile.read_file(path)
    file_seq = int(contents.attrs["flush_count"])
    entries = _journal.new_entries(path, journal.entries, file_seq)
    return _build_dataset(contents, entries)


def _read_journal(path: str) -> _journal.JournalContents:
    try:
        return _journal.read_journal(_journal.journal_path(path))
    except OSError as error:
        raise RecordError(
            f"cannot read journal {_journal.journal_path(path)}: {error.strerror}"
        ) from None


def _build_dataset(
    contents: _ncfile.FileContents, entries: list[_journal.JournalEntry]
) -> xr.Dataset:
    names = list(contents.variables)
    for entry in entries:
        for name in entry.rows:
            if name in SCHEMA and name not in names:
                names.append(name)

    variables: dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, object]]] = {}
    for name in names:
        variables[name] = _merged_variable(name, contents, entries)

    coords = {name: variables.pop(name) for name in ("step", "label")}
    attrs = dict(contents.attrs)
    if entries:
        attrs["flush_count"] = entries[-1].seq
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def _merged_variable(
    name: str, contents: _ncfile.FileContents, entries: list[_journal.JournalEntry]
) -> tuple[tuple[str, ...], np.ndarray, dict[str, object]]:
    """Concatenate a variable's rows from the netCDF file and the journal entries."""
    if name in contents.variables:
        dims, data, attrs = contents.variables[name]
        stored: np.ndarray | None = data
    else:
        spec = SCHEMA[name]
        dims, stored = spec.dims, None
        attrs = {"long_name": spec.long_name, "units": spec.units}
    lead = dims[0]
    if lead not in UNLIMITED_DIMS or not entries:
        assert stored is not None
        return dims, stored, attrs

    sample = stored
    if sample is None:
        sample = next(entry.rows[name] for entry in entries if name in entry.rows)
    trailing = sample.shape[1:]
    parts = []
    if stored is None:
        parts.append(np.full((contents.dims[lead], *trailing), np.nan))
    else:
        parts.append(stored)
    for entry in entries:
        index = INDEX_VARIABLES[lead]
        count = entry.rows[index].shape[0] if index in entry.rows else 0
        if count == 0:
            continue
        if name in entry.rows:
            parts.append(entry.rows[name])
        else:
            parts.append(np.full((count, *trailing), np.nan))
    return dims, np.concatenate(parts), attrs


def record_info(path: str | os.PathLike[str]) -> RecordInfo:
    """Summarise a record (status, sizes, resumability, config) without loading its data.

    Raises
    ------
    RecordError
        If the file is missing, truncated, not netCDF4, or not a dynscope record.
    """
    path = os.fspath(path)
    journal = _read_journal(path)
    summary = _ncfile.read_summary(path)
    file_seq = int(summary.attrs["flush_count"])
    entries = _journal.new_entries(path, journal.entries, file_seq)

    sizes = dict(summary.dims)
    last_steps = dict(summary.last_steps)
    has_state = bool(summary.state_bytes)
    state_step = summary.state_step
    shapes = {name: dims for name, (dims, _) in summary.dtypes.items()}
    dtypes = {name: dtype for name, (_, dtype) in summary.dtypes.items()}
    for entry in entries:
        for dim, index in INDEX_VARIABLES.items():
            if index in entry.rows and entry.rows[index].size:
                sizes[dim] += entry.rows[index].shape[0]
                last_steps[dim] = int(entry.rows[index][-1])
        for name, values in entry.rows.items():
            if name in SCHEMA and name not in shapes:
                shapes[name] = SCHEMA[name].dims
                dtypes[name] = values.dtype
                for dim, size in zip(SCHEMA[name].dims[1:], values.shape[1:], strict=True):
                    sizes.setdefault(dim, size)
        if bool(entry.rows.get("has_state", np.asarray(True)).all()):
            has_state = True
            state_step = entry.last_step

    variable_bytes = {}
    for name, dims in shapes.items():
        count = int(np.prod([sizes[dim] for dim in dims], dtype=np.int64))
        variable_bytes[name] = count * dtypes[name].itemsize

    status = str(summary.attrs["status"])
    can_resume = (
        status in RESUMABLE_STATUSES and has_state and state_step == (last_steps["step"] or -1)
    )
    return RecordInfo(
        path=path,
        status=status,
        last_step=last_steps["step"],
        num_steps=sizes["step"],
        num_probes=sizes["probe"],
        num_snapshots=sizes["snapshot"],
        can_resume=can_resume,
        file_bytes=os.path.getsize(path),
        journal_bytes=journal.file_length,
        variable_bytes=variable_bytes,
        config=json.loads(str(summary.attrs["config"])),
    )


def open_records(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, parallel: bool = False
) -> xr.Dataset:
    """Open many records lazily (dask) as one Dataset along the options that differ.

    Each configuration option whose value differs between the records becomes a dimension
    (width, seed, lr, ...). An option that is also a variable or dimension of a record (``lr``,
    ``loss``) becomes ``config_<option>``; the attribute ``sweep_dims`` maps each new dimension
    to its option as JSON. Records of different lengths are padded with NaN. When the options do
    not form a full grid, the records are stacked along a ``record`` dimension instead, with the
    option values as coordinates along it.

    Parameters
    ----------
    paths
        A glob pattern, one path, or a sequence of paths.
    parallel
        Open the files in parallel with dask (helps for many files on a cluster).

    Raises
    ------
    RecordError
        If a file is not a readable record.
    ValueError
        If no file matches.
    """
    files = _expand_paths(paths)
    configs: dict[str, dict[str, Any]] = {}
    pending: set[str] = set()
    variable_names: set[str] = set()
    for path in files:
        journal = _read_journal(path)
        summary = _ncfile.read_summary(path)
        file_seq = int(summary.attrs["flush_count"])
        if _journal.new_entries(path, journal.entries, file_seq):
            pending.add(path)
        configs[path] = json.loads(str(summary.attrs["config"]))
        variable_names.update(summary.dtypes, summary.dims)

    options = differing_options(list(configs.values()))
    dim_names = {
        option: f"config_{option}" if option in variable_names else option for option in options
    }

    def prepare(ds: xr.Dataset, stack: bool) -> xr.Dataset:
        source = os.path.abspath(ds.encoding["source"])
        if source in pending:
            # Rows still in the journal are not in the netCDF file that open_mfdataset reads.
            ds = open_record(source)
        ds = ds.assign_coords(
            {dim: np.arange(ds.sizes[dim]) for dim in NUMBERED_DIMS if dim in ds.dims}
        )
        values = configs[source]
        if stack:
            ds = ds.expand_dims("record")
            return ds.assign_coords(
                {dim_names[o]: ("record", [values.get(o)]) for o in options}
                | {"record_path": ("record", [source])}
            )
        return ds.expand_dims({dim_names[o]: [values.get(o)] for o in options})

    common: dict[str, Any] = dict(
        data_vars="minimal",
        coords="minimal",
        compat="override",
        join="outer",
        parallel=parallel,
        combine_attrs="drop_conflicts",
        engine="netcdf4",
    )
    if options:
        try:
            combined = xr.open_mfdataset(
                files, combine="by_coords", preprocess=lambda ds: prepare(ds, False), **common
            )
        except ValueError as error:
            logger.info("records do not form a grid (%s); stacking them along 'record'", error)
            combined = None
    else:
        combined = None
    if combined is None:
        if len(files) == 1:
            combined = prepare(xr.open_dataset(files[0], chunks={}), False)
        else:
            combined = xr.open_mfdataset(
                files,
                combine="nested",
                concat_dim="record",
                preprocess=lambda ds: prepare(ds, True),
                **common,
            )
    combined.attrs["sweep_dims"] = json.dumps({dim_names[o]: o for o in options})
    return combined


def _expand_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        text = os.fspath(paths)
        if glob.has_magic(text):
            files = sorted(glob.glob(text))
            if not files:
                raise ValueError(f"no records match {text!r}: check the pattern")
        else:
            files = [text]
    else:
        files = [os.fspath(path) for path in paths]
        if not files:
            raise ValueError("no records given: pass a glob pattern or a list of paths")
    return [os.path.abspath(path) for path in files]


def differing_options(configs: list[dict[str, Any]]) -> list[str]:
    """Return the scalar options whose values are not the same in every config, in key order."""
    keys: list[str] = []
    for config in configs:
        for key in config:
            if key not in keys:
                keys.append(key)
    differing = []
    for key in keys:
        values = [config.get(key) for config in configs]
        if not all(isinstance(v, (str, int, float, bool)) for v in values):
            continue
        if len(set(values)) > 1:
            differing.append(key)
    return differing
