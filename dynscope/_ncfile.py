"""Write, extend and read the netCDF4 file of a record: schema, chunking and signature check.

This module holds what `dynscope.store` needs to know about netCDF4/HDF5. The file is only ever
written under a temporary name and then renamed over the record, so a reader never sees a partly
written file at the record's path.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import netCDF4
import numpy as np

UNLIMITED_DIMS = ("step", "probe", "snapshot")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
STATE_GROUP = "resume"
# Bytes of one chunk along an unlimited dimension: large enough for zlib to work well and for
# reads of one variable to touch few chunks, small enough that a probe or snapshot row is cheap.
CHUNK_TARGET_BYTES = 256 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024


class RecordError(ValueError):
    """A record file that is missing, corrupt, or not a dynscope record."""


@dataclass(frozen=True)
class VariableSpec:
    """One variable of the record schema; dtype "param" means the record's param_dtype."""

    dims: tuple[str, ...]
    dtype: str
    long_name: str
    units: str
    optional: bool = False


SCHEMA: dict[str, VariableSpec] = {
    "step": VariableSpec(("step",), "i8", "training step", "1"),
    "label": VariableSpec(("label",), "i8", "class label", "1"),
    "loss": VariableSpec(("step",), "f8", "loss minimised at this step (full batch)", "1"),
    "static_loss": VariableSpec(("step",), "f8", "static counterpart of the loss", "1"),
    "minibatch_loss": VariableSpec(("step",), "f8", "loss on the mini-batch of this step", "1"),
    "train_accuracy": VariableSpec(("step",), "f8", "training accuracy", "1"),
    "val_accuracy": VariableSpec(("step",), "f8", "validation accuracy", "1"),
    "grad_norm": VariableSpec(("step",), "f8", "Euclidean norm of the loss gradient", "1"),
    "lr": VariableSpec(("step",), "f8", "learning rate", "1"),
    "gamma": VariableSpec(("step", "label"), "f8", "class weights Gamma_k(t) of the loss", "1"),
    "probe_step": VariableSpec(("probe",), "i8", "training step of the curvature probe", "1"),
    "eigenvalues": VariableSpec(
        ("probe", "eig"), "f8", "Hessian eigenvalues of the loss, descending", "1"
    ),
    "hessian_trace": VariableSpec(("probe",), "f8", "trace of the Hessian of the loss", "1"),
    "eigenvalue_residuals": VariableSpec(
        ("probe", "eig"), "f8", "residual norm ||H v - lambda v|| of each eigenpair", "1", True
    ),
    "top_eigenvectors": VariableSpec(
        ("probe", "eigenvector", "param"), "param", "top Hessian eigenvectors", "1", True
    ),
    "ntk_eigenvalues": VariableSpec(
        ("probe", "ntk"), "f8", "neural tangent kernel eigenvalues, descending", "1", True
    ),
    "snapshot_step": VariableSpec(("snapshot",), "i8", "training step of the snapshot", "1"),
    "params": VariableSpec(
        ("snapshot", "param"), "param", "flat parameter vector (or its projection)", "1"
    ),
}
REQUIRED_VARIABLES = tuple(name for name, spec in SCHEMA.items() if not spec.optional)
REQUIRED_ATTRIBUTES = ("config", "status", "Conventions", "param_dtype", "flush_count")


@dataclass(frozen=True)
class FileContents:
    """Everything read from a record's netCDF file, as numpy arrays."""

    attrs: dict[str, Any]
    dims: dict[str, int]
    variables: dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, object]]]
    state_bytes: bytes
    state_step: int


@dataclass(frozen=True)
class FileSummary:
    """The attributes, dimension sizes and last steps of a record file, read without the data."""

    attrs: dict[str, Any]
    dims: dict[str, int]
    dtypes: dict[str, tuple[tuple[str, ...], np.dtype]]
    last_steps: dict[str, int | None]
    state_bytes: bytes
    state_step: int


def check_signature(path: str) -> None:
    """Raise RecordError unless `path` starts like a complete HDF5 (netCDF4) file.

    The check reads the HDF5 superblock and compares its end-of-file address with the file
    size, so a truncated file is rejected before the HDF5 library parses it.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(64)
    except FileNotFoundError:
        raise RecordError(f"record not found: {path}; check the path") from None
    except IsADirectoryError:
        raise RecordError(f"record path is a directory, not a file: {path}") from None
    except OSError as error:
        raise RecordError(f"cannot read record {path}: {error.strerror}") from None

    if size == 0:
        raise RecordError(f"record {path} is empty (0 bytes); it was never written")
    if not head.startswith(HDF5_SIGNATURE):
        raise RecordError(f"not a dynscope record: {path} is not a netCDF4/HDF5 file")
    end_of_file = _superblock_end_of_file(head)
    if end_of_file is not None and end_of_file > size:
        raise RecordError(
            f"record {path} is truncated: {size} bytes of {end_of_file}; the file is incomplete"
        )


def _superblock_end_of_file(head: bytes) -> int | None:
    """Return base address plus end-of-file address from an HDF5 superblock, or None."""
    if len(head) < 13:
        return None
    version = head[8]
    if version in (0, 1):
        offset_size = head[13]
        base_at = 24 if version == 0 else 28
    elif version in (2, 3):
        offset_size = head[9]
        base_at = 12
    else:
        return None
    formats = {4: "<I", 8: "<Q"}
    if offset_size not in formats:
        return None
    fmt = formats[offset_size]
    eof_at = base_at + 2 * offset_size
    if len(head) < eof_at + offset_size:
        return None
    base = struct.unpack_from(fmt, head, base_at)[0]
    end = struct.unpack_from(fmt, head, eof_at)[0]
    undefined = (1 << (8 * offset_size)) - 1
    if end == undefined:
        return None
    return int(base + end)


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Choose chunk sizes for a variable whose first dimension is unlimited."""
    trailing = [max(size, 1) for size in shape[1:]]
    row_bytes = itemsize * int(np.prod(trailing, dtype=np.int64))
    if row_bytes > MAX_CHUNK_BYTES:
        # A row too large for one chunk (a big parameter vector) is split along its last axis.
        inner = int(np.prod(trailing[:-1], dtype=np.int64)) * itemsize
        trailing[-1] = max(1, MAX_CHUNK_BYTES // inner)
        return (1, *trailing)
    rows = max(1, min(4096, CHUNK_TARGET_BYTES // max(row_bytes, 1)))
    return (rows, *trailing)


def create_file(
    path: str,
    *,
    attrs: dict[str, object],
    labels: np.ndarray,
    num_params: int,
    num_eigs: int,
    compression: int,
    param_dtype: str,
) -> None:
    """Write an empty record (schema, labels, attributes) to `path` and fsync it."""
    with netCDF4.Dataset(path, "w", format="NETCDF4") as ds:
        for name in UNLIMITED_DIMS:
            ds.createDimension(name, None)
        ds.createDimension("label", len(labels))
        # netCDF treats a dimension of size 0 as unlimited; records without probes keep eig empty.
        ds.createDimension("param", num_params)
        ds.createDimension("eig", num_eigs)
        for key, value in attrs.items():
            ds.setncattr(key, value)
        for name, spec in SCHEMA.items():
            if not spec.optional:
                _create_variable(ds, name, compression, param_dtype)
        ds.variables["label"][:] = labels
        group = ds.createGroup(STATE_GROUP)
        group.createDimension("byte", None)
        state = group.createVariable("state", "u1", ("byte",), chunksizes=(1 << 16,))
        state.long_name = "resume state of the last flush (npz archive bytes)"
        state.units = "1"
        group.nbytes = 0
        group.last_step = -1
    fsync_path(path)


def _create_variable(
    ds: netCDF4.Dataset, name: str, compression: int, param_dtype: str
) -> netCDF4.Variable:
    spec = SCHEMA[name]
    dtype = np.dtype(param_dtype if spec.dtype == "param" else spec.dtype)
    shape = tuple(len(ds.dimensions[dim]) for dim in spec.dims)
    options: dict[str, Any] = {}
    if ds.dimensions[spec.dims[0]].isunlimited():
        options["chunksizes"] = chunk_shape(shape, dtype.itemsize)
    if compression > 0:
        options.update(zlib=True, complevel=compression, shuffle=True)
    fill = np.nan if dtype.kind == "f" else False
    variable = ds.createVariable(name, dtype, spec.dims, fill_value=fill, **options)
    variable.long_name = spec.long_name
    variable.units = spec.units
    return variable


def extend_file(
    path: str,
    entries: list[dict[str, np.ndarray]],
    *,
    attrs: dict[str, object],
    state_bytes: bytes | None,
    state_last_step: int,
) -> None:
    """Append journal rows to the record at `path`, update attributes and state, and fsync."""
    with netCDF4.Dataset(path, "a") as ds:
        ds.set_auto_maskandscale(False)
        compression = int(ds.getncattr("compression"))
        param_dtype = str(ds.getncattr("param_dtype"))
        for rows in entries:
            _append_rows(ds, rows, compression, param_dtype)
        for key, value in attrs.items():
            ds.setncattr(key, value)
        if state_bytes is not None:
            group = ds.groups[STATE_GROUP]
            group.variables["state"][: len(state_bytes)] = np.frombuffer(state_bytes, np.uint8)
            group.nbytes = len(state_bytes)
            group.last_step = state_last_step
    fsync_path(path)


def _append_rows(
    ds: netCDF4.Dataset, rows: dict[str, np.ndarray], compression: int, param_dtype: str
) -> None:
    for dim in UNLIMITED_DIMS:
        names = [name for name in rows if SCHEMA[name].dims[0] == dim]
        if not names:
            continue
        start = len(ds.dimensions[dim])
        for name in names:
            values = rows[name]
            if name not in ds.variables:
                _create_optional(ds, name, values, compression, param_dtype)
            ds.variables[name][start : start + values.shape[0]] = values


def _create_optional(
    ds: netCDF4.Dataset, name: str, values: np.ndarray, compression: int, param_dtype: str
) -> None:
    spec = SCHEMA[name]
    for dim, size in zip(spec.dims[1:], values.shape[1:], strict=True):
        if dim not in ds.dimensions:
            ds.createDimension(dim, size)
    _create_variable(ds, name, compression, param_dtype)


def read_file(path: str) -> FileContents:
    """Read a record's netCDF file into memory; raise RecordError if it is not a record."""
    check_signature(path)
    try:
        with netCDF4.Dataset(path, "r") as ds:
            ds.set_auto_maskandscale(False)
            attrs = {key: ds.getncattr(key) for key in ds.ncattrs()}
            dims = {name: len(dim) for name, dim in ds.dimensions.items()}
            variables = {}
            for name, variable in ds.variables.items():
                var_attrs = {key: variable.getncattr(key) for key in variable.ncattrs()}
                var_attrs.pop("_FillValue", None)
                variables[name] = (tuple(variable.dimensions), np.asarray(variable[:]), var_attrs)
            state_bytes, state_step = _read_state(ds)
    except OSError as error:
        raise RecordError(f"cannot read record {path}: {error}") from None

    _check_schema(path, attrs, variables)
    return FileContents(
        attrs=attrs,
        dims=dims,
        variables=variables,
        state_bytes=state_bytes,
        state_step=state_step,
    )


def read_summary(path: str) -> FileSummary:
    """Read a record's attributes, sizes, last steps and resume state, but not its data."""
    check_signature(path)
    try:
        with netCDF4.Dataset(path, "r") as ds:
            ds.set_auto_maskandscale(False)
            attrs = {key: ds.getncattr(key) for key in ds.ncattrs()}
            dims = {name: len(dim) for name, dim in ds.dimensions.items()}
            dtypes = {
                name: (tuple(variable.dimensions), np.dtype(variable.dtype))
                for name, variable in ds.variables.items()
            }
            _check_schema(path, attrs, dtypes)
            last_steps: dict[str, int | None] = {}
            for dim, name in zip(
                UNLIMITED_DIMS, ("step", "probe_step", "snapshot_step"), strict=True
            ):
                size = dims[dim]
                last_steps[dim] = int(ds.variables[name][size - 1]) if size else None
            state_bytes, state_step = _read_state(ds)
    except OSError as error:
        raise RecordError(f"cannot read record {path}: {error}") from None
    return FileSummary(
        attrs=attrs,
        dims=dims,
        dtypes=dtypes,
        last_steps=last_steps,
        state_bytes=state_bytes,
        state_step=state_step,
    )


def _read_state(ds: netCDF4.Dataset) -> tuple[bytes, int]:
    if STATE_GROUP not in ds.groups:
        return b"", -1
    group = ds.groups[STATE_GROUP]
    nbytes = int(group.getncattr("nbytes"))
    state_bytes = np.asarray(group.variables["state"][:nbytes]).tobytes()
    return state_bytes, int(group.getncattr("last_step"))


def _check_schema(path: str, attrs: dict[str, object], variables: Mapping[str, object]) -> None:
    missing = [name for name in REQUIRED_VARIABLES if name not in variables]
    missing += [f"attribute {name}" for name in REQUIRED_ATTRIBUTES if name not in attrs]
    if missing:
        raise RecordError(f"not a dynscope record: {path} lacks {', '.join(missing)}")


def fsync_path(path: str) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str) -> None:
    """Flush a directory entry (after a rename) to disk, where the platform allows it."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
