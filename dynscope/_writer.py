"""Write a record: `RecordWriter` appends rows, flushes them to the journal and compacts.

The file format and its guarantees are described in `dynscope.store`.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import json
import logging
import math
import os
import platform
import resource
import shutil
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from dynscope import _journal, _ncfile
from dynscope._ncfile import UNLIMITED_DIMS, RecordError

__all__ = ["RecordWriteError", "RecordWriter"]

logger = logging.getLogger("dynscope.store")

STATUSES = ("running", "complete", "diverged", "interrupted")
FINAL_STATUSES = ("complete", "diverged", "interrupted")
STEP_SCALARS = (
    "loss",
    "static_loss",
    "minibatch_loss",
    "train_accuracy",
    "val_accuracy",
    "grad_norm",
    "lr",
)
PROBE_EXTRAS = ("top_eigenvectors", "eigenvalue_residuals", "ntk_eigenvalues")
INDEX_VARIABLES = {"step": "step", "probe": "probe_step", "snapshot": "snapshot_step"}
CONVENTIONS = "CF-1.10"
# Estimate of the bytes one HDF5 write may add to a file. A failure within this margin of the file
# size limit or of a full disk is reported as caused by it.
MAX_WRITE_BYTES = 8 * 1024 * 1024


class RecordWriteError(OSError):
    """A failed write to a record (full disk, file size limit, permissions)."""


class RecordWriter:
    """Append rows to a record and make them durable with `flush`; see the module docstring.

    Create one with `RecordWriter.create` or `RecordWriter.resume`, not with the constructor.
    """

    def __init__(
        self,
        path: str,
        *,
        summary: _ncfile.FileSummary,
        journal: _journal.JournalContents,
        seq: int,
        last_steps: dict[str, int | None],
        state_step: int | None,
    ) -> None:
        self.path = path
        self.config_json = str(summary.attrs["config"])
        self.num_labels = summary.dims["label"]
        self.num_params = summary.dims["param"]
        self.num_eigs = summary.dims["eig"]
        self.param_dtype = np.dtype(str(summary.attrs["param_dtype"]))
        self._extra_sizes: dict[str, int] = {
            dim: summary.dims[dim] for dim in ("eigenvector", "ntk") if dim in summary.dims
        }
        self._history = str(summary.attrs.get("history", ""))
        self._file_seq = int(summary.attrs["flush_count"])
        self._seq = seq
        self._last_steps = dict(last_steps)
        self._flushed_steps = dict(last_steps)
        self._state_step = state_step
        self._journal = _journal.JournalFile(_journal.journal_path(path), journal.valid_length)
        self._file_size = os.path.getsize(path)
        self._closed = False
        self._lock: int | None = None
        self._clear_pending()

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        config_json: str,
        attrs: dict[str, Any],
        labels: Sequence[int],
        num_params: int,
        num_eigs: int,
        compression: int = 4,
        param_dtype: str = "float64",
        force: bool = False,
    ) -> RecordWriter:
        """Create an empty record at `path` and return a writer for it.

        Parameters
        ----------
        path
            Path of the netCDF file; its folder must exist.
        config_json
            The run's whole configuration as one JSON string (stored as attribute ``config``).
        attrs
            Flat scalar attributes (str, int, float or bool) such as lr, width, seed, loss.
        labels
            Class labels, the ``label`` coordinate.
        num_params
            Length of a stored parameter vector (P, or K after a random projection).
        num_eigs
            Number of Hessian eigenvalues per probe (0 when the run has no probes).
        compression
            zlib level from 0 (off) to 9.
        param_dtype
            "float64" or "float32": the dtype of ``params`` and ``top_eigenvectors``.
        force
            Replace an existing record instead of raising.

        Raises
        ------
        ValueError
            For an invalid option, an existing record without `force`, or a missing folder.
        RecordWriteError
            If the file cannot be written.
        """
        path = os.fspath(path)
        _check_create_options(path, config_json, labels, num_params, num_eigs, compression)
        if param_dtype not in ("float64", "float32"):
            raise ValueError(f"invalid param_dtype {param_dtype!r}: use float64 or float32")
        if os.path.exists(path) and not force:
            raise ValueError(f"record {path} already exists: use force to replace it or resume it")
        lock = _acquire_lock(path)
        try:
            writer = cls._create_locked(
                path, config_json, attrs, labels, num_params, num_eigs, compression, param_dtype
            )
        except BaseException:
            _release_lock(path, lock)
            raise
        writer._lock = lock
        return writer

    @classmethod
    def _create_locked(
        cls,
        path: str,
        config_json: str,
        attrs: dict[str, Any],
        labels: Sequence[int],
        num_params: int,
        num_eigs: int,
        compression: int,
        param_dtype: str,
    ) -> RecordWriter:
        file_attrs: dict[str, Any] = {
            "Conventions": CONVENTIONS,
            "title": "dynscope training record",
            "history": _history_line("created"),
            "status": "running",
            "config": config_json,
            "compression": int(compression),
            "param_dtype": param_dtype,
            "flush_count": 0,
        }
        file_attrs.update(_versions())
        for key, value in attrs.items():
            file_attrs[key] = _attribute_value(key, value)

        try:
            for stale in (path, _journal.journal_path(path), path + ".tmp"):
                if os.path.exists(stale):
                    os.remove(stale)
            _ncfile.create_file(
                path + ".tmp",
                attrs=file_attrs,
                labels=np.asarray(labels, dtype=np.int64),
                num_params=num_params,
                num_eigs=num_eigs,
                compression=compression,
                param_dtype=param_dtype,
            )
            os.replace(path + ".tmp", path)
            _ncfile.fsync_directory(path)
        except (OSError, RuntimeError) as error:
            cause = _failure_cause(error, path + ".tmp")
            _remove_quietly(path + ".tmp")
            raise _write_error(path, cause) from error

        summary = _ncfile.read_summary(path)
        empty_steps: dict[str, int | None] = {dim: None for dim in UNLIMITED_DIMS}
        return cls(
            path,
            summary=summary,
            journal=_journal.JournalContents(),
            seq=0,
            last_steps=empty_steps,
            state_step=None,
        )

    @classmethod
    def resume(cls, path: str | Path) -> tuple[RecordWriter, dict[str, np.ndarray]]:
        """Open an existing record for appending after its last flush.

        Returns
        -------
        writer, state
            A writer whose next step follows the last flushed one, and the resume state passed
            to that flush (arrays as given to `flush`).

        Raises
        ------
        RecordError
            If the record is missing or corrupt, or was never flushed with a state.
        """
        path = os.fspath(path)
        lock = _acquire_lock(path)
        try:
            writer, state = cls._resume_locked(path)
        except BaseException:
            _release_lock(path, lock)
            raise
        writer._lock = lock
        return writer, state

    @classmethod
    def _resume_locked(cls, path: str) -> tuple[RecordWriter, dict[str, np.ndarray]]:
        _remove_quietly(path + ".tmp")
        contents = _journal.read_journal(_journal.journal_path(path))
        summary = _ncfile.read_summary(path)
        file_seq = int(summary.attrs["flush_count"])
        entries = _journal.new_entries(path, contents.entries, file_seq)
        if contents.torn:
            logger.warning(
                "ignoring %d bytes of a torn journal record in %s",
                contents.file_length - contents.valid_length,
                _journal.journal_path(path),
            )

        last_steps = dict(summary.last_steps)
        state_bytes, state_step = summary.state_bytes, summary.state_step
        state: dict[str, np.ndarray] | None = None
        for entry in entries:
            for dim, name in INDEX_VARIABLES.items():
                if name in entry.rows and entry.rows[name].size:
                    last_steps[dim] = int(entry.rows[name][-1])
            if entry.rows.get("has_state", np.asarray(True)).all():
                state = entry.state
                state_step = entry.last_step
        if state is None:
            if not state_bytes:
                raise RecordError(
                    f"record {path} has no resume state because it was never flushed; "
                    "start it again with --force"
                )
            state = _journal.decode_state(state_bytes)
        if last_steps["step"] is not None and state_step != last_steps["step"]:
            raise RecordError(
                f"record {path} cannot be resumed: its rows end at step {last_steps['step']} "
                f"but its resume state is from step {state_step}"
            )

        seq = entries[-1].seq if entries else file_seq
        writer = cls(
            path,
            summary=summary,
            journal=contents,
            seq=seq,
            last_steps=last_steps,
            state_step=state_step,
        )
        writer._history += "\n" + _history_line("resumed")
        return writer, state

    @property
    def last_flushed_step(self) -> int | None:
        """The last step made durable by `flush`, or None before the first flushed step."""
        return self._flushed_steps["step"]

    @property
    def closed(self) -> bool:
        """Whether `close` has been called."""
        return self._closed

    def append_step(self, step: int, **values: Any) -> None:
        """Append the row of one training step.

        Parameters
        ----------
        step
            The step number; it must exceed the previous appended step.
        **values
            ``gamma`` (C weights, required) and the floats loss, static_loss, minibatch_loss,
            train_accuracy, val_accuracy, grad_norm, lr (each NaN when omitted).
        """
        self._check_open()
        self._check_order("step", step)
        unknown = set(values) - set(STEP_SCALARS) - {"gamma"}
        if unknown:
            raise ValueError(
                f"unknown step values {sorted(unknown)}: use {', '.join(STEP_SCALARS)}, gamma"
            )
        if "gamma" not in values:
            raise ValueError("append_step needs gamma: pass the C class weights of this step")
        gamma = np.asarray(values["gamma"], dtype=np.float64)
        if gamma.shape != (self.num_labels,):
            raise ValueError(
                f"invalid gamma shape {gamma.shape}: expected ({self.num_labels},), one per label"
            )

        self._steps.append(int(step))
        for name in STEP_SCALARS:
            self._scalars[name].append(float(values.get(name, math.nan)))
        self._gamma.append(gamma)
        self._last_steps["step"] = int(step)

    def append_probe(
        self, step: int, eigenvalues: np.ndarray, trace: float, **extras: np.ndarray
    ) -> None:
        """Append one curvature probe.

        Parameters
        ----------
        step
            The training step of the probe; it must exceed the previous probe's step.
        eigenvalues
            Hessian eigenvalues, descending; at most ``num_eigs`` (fewer are NaN-padded).
        trace
            Trace of the Hessian.
        **extras
            Optional ``top_eigenvectors`` (k, num_params), ``eigenvalue_residuals`` (at most
            num_eigs) and ``ntk_eigenvalues`` (K,); k and K must stay the same for a record.
        """
        self._check_open()
        self._check_order("probe", step)
        unknown = set(extras) - set(PROBE_EXTRAS)
        if unknown:
            raise ValueError(
                f"unknown probe extras {sorted(unknown)}: use {', '.join(PROBE_EXTRAS)}"
            )

        row: dict[str, np.ndarray] = {
            "probe_step": np.asarray(int(step), dtype=np.int64),
            "eigenvalues": self._padded_eigs("eigenvalues", eigenvalues),
            "hessian_trace": np.asarray(float(trace), dtype=np.float64),
        }
        for name, value in extras.items():
            if name == "eigenvalue_residuals":
                row[name] = self._padded_eigs(name, value)
            elif name == "top_eigenvectors":
                row[name] = self._extra_array(name, value, "eigenvector", self.param_dtype)
            else:
                row[name] = self._extra_array(name, value, "ntk", np.dtype(np.float64))
        self._probes.append(row)
        self._last_steps["probe"] = int(step)

    def append_snapshot(self, step: int, params: np.ndarray) -> None:
        """Append one parameter snapshot of length ``num_params``, stored in ``param_dtype``."""
        self._check_open()
        self._check_order("snapshot", step)
        values = np.asarray(params, dtype=self.param_dtype)
        if values.shape != (self.num_params,):
            raise ValueError(
                f"invalid snapshot shape {values.shape}: expected ({self.num_params},); "
                "project the parameters to num_params first"
            )
        self._snapshot_steps.append(int(step))
        self._snapshots.append(values)
        self._last_steps["snapshot"] = int(step)

    def flush(self, state: dict[str, np.ndarray]) -> None:
        """Make every row appended so far and `state` durable (see the module docstring).

        Parameters
        ----------
        state
            The resume state: numeric or string numpy arrays (no object arrays), returned by
            `RecordWriter.resume`.

        Raises
        ------
        RecordWriteError
            If the journal or the compacted file cannot be written; earlier flushes stay readable.
        """
        self._check_open()
        self._write_entry(_check_state(state))
        if self._journal.length > self._file_size:
            self._compact(status="running")

    def close(self, status: str = "complete") -> None:
        """Fold the journal into the netCDF file with the final `status` and delete the journal.

        Rows appended since the last flush are written too, but the resume state stays the one
        of the last flush, so flush before closing a record that may be resumed.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"invalid status {status!r}: use one of {', '.join(FINAL_STATUSES)}")
        self._check_open()
        if self._has_pending():
            self._write_entry(None)
        self._history += "\n" + _history_line(f"closed with status {status}")
        self._compact(status=status)
        self._journal.close()
        _remove_quietly(self._journal.path)
        self._closed = True
        if self._lock is not None:
            _release_lock(self.path, self._lock)
            self._lock = None

    def _write_entry(self, state: dict[str, np.ndarray] | None) -> None:
        rows = self._pending_rows()
        rows["has_state"] = np.asarray(state is not None)
        last_step = self._last_steps["step"]
        record = _journal.encode_entry(
            self._seq + 1, -1 if last_step is None else last_step, rows, state or {}
        )
        try:
            self._journal.append(record)
        except OSError as error:
            self._journal.rollback()
            raise _write_error(self._journal.path, error.strerror or str(error)) from error
        self._seq += 1
        self._flushed_steps = dict(self._last_steps)
        if state is not None:
            self._state_step = last_step
        self._clear_pending()

    def _compact(self, status: str) -> None:
        contents = _journal.read_journal(self._journal.path)
        entries = _journal.new_entries(self.path, contents.entries, self._file_seq)
        state_bytes: bytes | None = None
        state_step = -1
        for entry in entries:
            if entry.rows.get("has_state", np.asarray(True)).all():
                state_bytes = _journal.encode_state(entry.state)
                state_step = entry.last_step
        rows = [{k: v for k, v in e.rows.items() if k != "has_state"} for e in entries]
        attrs = {"status": status, "flush_count": self._seq, "history": self._history}

        temporary = self.path + ".tmp"
        try:
            shutil.copyfile(self.path, temporary)
            _ncfile.extend_file(
                temporary,
                rows,
                attrs=attrs,
                state_bytes=state_bytes,
                state_last_step=state_step,
            )
            os.replace(temporary, self.path)
            _ncfile.fsync_directory(self.path)
            self._journal.clear()
        except (OSError, RuntimeError) as error:
            # netCDF4 reports HDF5 write failures as RuntimeError("NetCDF: HDF error").
            cause = _failure_cause(error, temporary)
            _remove_quietly(temporary)
            raise _write_error(self.path, cause) from error
        self._file_seq = self._seq
        self._file_size = os.path.getsize(self.path)

    def _clear_pending(self) -> None:
        self._steps: list[int] = []
        self._scalars: dict[str, list[float]] = {name: [] for name in STEP_SCALARS}
        self._gamma: list[np.ndarray] = []
        self._probes: list[dict[str, np.ndarray]] = []
        self._snapshot_steps: list[int] = []
        self._snapshots: list[np.ndarray] = []

    def _has_pending(self) -> bool:
        return bool(self._steps or self._probes or self._snapshots)

    def _pending_rows(self) -> dict[str, np.ndarray]:
        rows: dict[str, np.ndarray] = {}
        if self._steps:
            rows["step"] = np.asarray(self._steps, dtype=np.int64)
            for name in STEP_SCALARS:
                rows[name] = np.asarray(self._scalars[name], dtype=np.float64)
            rows["gamma"] = np.stack(self._gamma)
        if self._probes:
            names = {name for probe in self._probes for name in probe}
            for name in sorted(names):
                rows[name] = _stack_padded(name, self._probes)
        if self._snapshots:
            rows["snapshot_step"] = np.asarray(self._snapshot_steps, dtype=np.int64)
            rows["params"] = np.stack(self._snapshots)
        return rows

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"record writer for {self.path} is closed; resume it to append")

    def _check_order(self, dim: str, step: int) -> None:
        previous = self._last_steps[dim]
        if previous is not None and step <= previous:
            raise ValueError(
                f"invalid {dim} step {step}: it must exceed the previous one ({previous})"
            )

    def _padded_eigs(self, name: str, values: np.ndarray) -> np.ndarray:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        if array.size > self.num_eigs:
            raise ValueError(
                f"too many {name}: {array.size} for num_eigs={self.num_eigs}; "
                "create the record with a larger num_eigs"
            )
        padded = np.full(self.num_eigs, np.nan)
        padded[: array.size] = array
        return padded

    def _extra_array(self, name: str, values: np.ndarray, dim: str, dtype: np.dtype) -> np.ndarray:
        array = np.asarray(values, dtype=dtype)
        expected_ndim = 2 if dim == "eigenvector" else 1
        if array.ndim != expected_ndim or (
            dim == "eigenvector" and array.shape[1] != self.num_params
        ):
            raise ValueError(f"invalid {name} shape {array.shape} for num_params={self.num_params}")
        size = self._extra_sizes.setdefault(dim, array.shape[0])
        if array.shape[0] != size:
            raise ValueError(
                f"invalid {name} length {array.shape[0]}: this record stores {size} per probe"
            )
        return array


def _stack_padded(name: str, probes: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Stack one probe variable, filling NaN for probes that did not pass it."""
    template = next(probe[name] for probe in probes if name in probe)
    parts = []
    for probe in probes:
        if name in probe:
            parts.append(probe[name])
        else:
            parts.append(np.full(template.shape, np.nan, dtype=template.dtype))
    return np.stack(parts)


def _check_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    checked: dict[str, np.ndarray] = {}
    for key, value in state.items():
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise ValueError(
                f"invalid resume state {key!r}: object arrays cannot be stored; "
                "convert it to a numeric array"
            )
        checked[str(key)] = array
    return checked


def _check_create_options(
    path: str,
    config_json: str,
    labels: Sequence[int],
    num_params: int,
    num_eigs: int,
    compression: int,
) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"invalid record path {path}: folder {folder} does not exist")
    try:
        json.loads(config_json)
    except (TypeError, ValueError):
        raise ValueError("invalid config_json: pass the configuration as a JSON string") from None
    if len(labels) < 1:
        raise ValueError("invalid labels: pass at least one class label")
    if num_params < 1:
        raise ValueError(f"invalid num_params {num_params}: use the parameter count (>= 1)")
    if num_eigs < 0:
        raise ValueError(f"invalid num_eigs {num_eigs}: use 0 or more")
    if not (isinstance(compression, int) and 0 <= compression <= 9):
        raise ValueError(f"invalid compression {compression!r}: use a zlib level from 0 to 9")


def _attribute_value(key: str, value: Any) -> str | int | float:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return value
    raise ValueError(
        f"invalid attribute {key}={value!r}: use a str, int, float or bool "
        "(put structured values in config_json)"
    )


@functools.cache
def _versions() -> dict[str, str]:
    """Return the versions of Python and the packages a record depends on (read once)."""
    versions = {"python_version": platform.python_version()}
    for package in ("dynscope", "torch", "numpy", "netCDF4", "xarray"):
        try:
            versions[f"{package.lower()}_version"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[f"{package.lower()}_version"] = "not installed"
    return versions


def _history_line(action: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    version = _versions()["dynscope_version"]
    return f"{now}: {action} by dynscope {version}"


def _write_error(path: str, cause: str) -> RecordWriteError:
    return RecordWriteError(f"cannot write record {path}: {cause}")


def _failure_cause(error: OSError | RuntimeError, written: str) -> str:
    """Describe a failed write; name the file size limit or a full disk when they explain it."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    try:
        size = os.path.getsize(written)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(written))).free
    except OSError:
        return str(error)
    if limit != resource.RLIM_INFINITY and size >= limit - MAX_WRITE_BYTES:
        return f"File too large (the file size limit is {limit} bytes): {error}"
    if free < MAX_WRITE_BYTES:
        return f"No space left on device: {error}"
    return str(error)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# Locks this process has taken, by record path. A new writer in the same process takes over the
# lock of an abandoned one (as after a simulated crash), because the lock only keeps out others.
_HELD_LOCKS: dict[str, int] = {}


def _acquire_lock(path: str) -> int:
    """Take an exclusive lock on ``path + ".lock"`` so that only one process writes a record.

    The operating system releases the lock when the process ends, so a killed writer never
    leaves a record locked.
    """
    key = os.path.realpath(path)
    if key in _HELD_LOCKS:
        return _HELD_LOCKS[key]
    try:
        descriptor = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise _write_error(path, f"cannot create its lock file: {error.strerror}") from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise RecordError(
            f"record {path} is being written by another process; wait for it to end or "
            "choose another output"
        ) from None
    _HELD_LOCKS[key] = descriptor
    return descriptor


def _release_lock(path: str, descriptor: int) -> None:
    key = os.path.realpath(path)
    if _HELD_LOCKS.get(key) != descriptor:
        return
    del _HELD_LOCKS[key]
    _remove_quietly(path + ".lock")
    os.close(descriptor)
