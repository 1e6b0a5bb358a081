"""Stream a training run into one netCDF4 record, crash-safely, and read records back.

This is the only module that reads or writes the record file format. A record at `path` is
two files:

``path``
    A complete netCDF4 file (schema below). It is never modified in place: each rewrite copies
    it to ``path + ".tmp"``, appends rows there, fsyncs it, renames it over ``path`` with
    `os.replace` and fsyncs the directory. A kill at any moment leaves either the old or the new
    complete file at ``path`` (a stale ``.tmp`` is ignored by readers and removed on resume).
``path + ".journal"``
    An append-only journal. Each `RecordWriter.flush` appends one record (magic, length, CRC32,
    an npz archive with the rows since the previous flush and the resume state, see
    `dynscope._journal`) and fsyncs it before returning. Readers replay the valid records and
    ignore a torn tail. The journal is folded into the netCDF file ("compacted") when it grows
    past the size of the netCDF file, so the rewrite cost stays linear in the record's size, and
    at `RecordWriter.close`, which deletes it.

Guarantees: once `flush` returns, a SIGKILL at any later moment (during a later flush or
compaction included) leaves a record that `open_record` opens with every row appended before that
flush, and `RecordWriter.resume` returns the state passed to the last completed flush. Rows
appended after the last flush are lost by design. Each flush carries a sequence number and the
netCDF file stores the number of the last flush folded into it (`flush_count`), so journal records
left behind by a kill between the rename and the journal truncation are skipped, never duplicated.
Readers read the journal before the netCDF file, which keeps a read consistent while a writer
compacts. A write failure (full disk, file size limit) raises `RecordWriteError` naming the path
and the cause; what was flushed before stays readable.

Schema: dimensions ``step``, ``probe``, ``snapshot`` (unlimited), ``label``, ``param``, ``eig``
(and ``eigenvector``, ``ntk`` when those extras are recorded). Coordinates ``step`` (int64 step
numbers) and ``label``. Per step: ``loss``, ``static_loss``, ``minibatch_loss`` (NaN for
full-batch steps), ``train_accuracy``, ``val_accuracy``, ``grad_norm``, ``lr``,
``gamma(step, label)``. Per probe:
``probe_step``, ``eigenvalues(probe, eig)`` descending (NaN-padded when fewer than ``eig``),
``hessian_trace`` and the optional ``eigenvalue_residuals``, ``top_eigenvectors``,
``ntk_eigenvalues``. Per snapshot: ``snapshot_step``, ``params(snapshot, param)`` in
``param_dtype``. Every variable has ``units`` and ``long_name``; losses and eigenvalues are
float64. Attributes: ``config`` (JSON), the caller's flat copies, ``status``, versions,
``Conventions``, ``history``, ``compression``, ``param_dtype``, ``flush_count``. The resume state
is an npz archive stored as bytes in the group ``/resume`` (xarray does not read groups).

Limits: one writer per record (nothing locks the files against a second writer); `open_record`
loads the whole record into memory.
"""

from dynscope._ncfile import RecordError
from dynscope._reader import (
    RecordInfo,
    differing_options,
    open_record,
    open_records,
    record_info,
)
from dynscope._writer import RecordWriteError, RecordWriter

__all__ = [
    "RecordError",
    "RecordInfo",
    "RecordWriteError",
    "RecordWriter",
    "differing_options",
    "open_record",
    "open_records",
    "record_info",
]
