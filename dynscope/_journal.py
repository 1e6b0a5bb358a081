"""Read and write the append-only journal that makes record flushes durable between rewrites.

A journal is a sequence of records, each written by one flush::

    magic  b"DSJ1"          4 bytes
    length of the payload   8 bytes, unsigned little-endian
    CRC32 of the payload    4 bytes, unsigned little-endian
    payload                 `length` bytes: an uncompressed npz archive (numpy.savez)

The npz keys are "seq" (the flush number, counting from 1 over the life of the record),
"last_step", rows as "row:<variable>" and the resume state as "state:<key>". A reader stops at
the first record whose header or checksum does not match: that is the torn tail of a flush that
was killed, and everything before it is intact because each flush calls fsync before returning.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger("dynscope.store")

MAGIC = b"DSJ1"
_HEADER = struct.Struct("<4sQI")
ROW_PREFIX = "row:"
STATE_PREFIX = "state:"


@dataclass(frozen=True)
class JournalEntry:
    """The rows and resume state written by one flush."""

    seq: int
    last_step: int
    rows: dict[str, np.ndarray]
    state: dict[str, np.ndarray]


@dataclass(frozen=True)
class JournalContents:
    """The valid entries of a journal and the byte length of its valid prefix."""

    entries: list[JournalEntry] = field(default_factory=list)
    valid_length: int = 0
    file_length: int = 0

    @property
    def torn(self) -> bool:
        """Whether bytes follow the last valid entry (a flush killed while writing)."""
        return self.file_length > self.valid_length


def encode_entry(
    seq: int, last_step: int, rows: dict[str, np.ndarray], state: dict[str, np.ndarray]
) -> bytes:
    """Encode one flush as a journal record (header plus npz payload)."""
    arrays: dict[str, np.ndarray] = {
        "seq": np.asarray(seq, dtype=np.int64),
        "last_step": np.asarray(last_step, dtype=np.int64),
    }
    for name, values in rows.items():
        arrays[ROW_PREFIX + name] = values
    for key, value in state.items():
        arrays[STATE_PREFIX + key] = value

    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    payload = buffer.getvalue()
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_journal(data: bytes) -> JournalContents:
    """Decode every valid entry of a journal's bytes, stopping at a torn or corrupt tail."""
    entries: list[JournalEntry] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        magic, length, checksum = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + length
        if magic != MAGIC or end > len(data):
            break
        payload = data[start:end]
        if zlib.crc32(payload) != checksum:
            break
        entry = _decode_payload(payload)
        if entry is None:
            break
        entries.append(entry)
        offset = end
    return JournalContents(entries=entries, valid_length=offset, file_length=len(data))


def read_journal(path: str) -> JournalContents:
    """Read and decode the journal at `path`; a missing journal has no entries."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return JournalContents()
    return decode_journal(data)


def _decode_payload(payload: bytes) -> JournalEntry | None:
    try:
        archive = np.load(io.BytesIO(payload), allow_pickle=False)
        arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, KeyError):
        # A payload whose checksum matches but does not parse was not written by this module.
        return None
    if "seq" not in arrays or "last_step" not in arrays:
        return None

    rows: dict[str, np.ndarray] = {}
    state: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key.startswith(ROW_PREFIX):
            rows[key[len(ROW_PREFIX) :]] = value
        elif key.startswith(STATE_PREFIX):
            state[key[len(STATE_PREFIX) :]] = value
    return JournalEntry(
        seq=int(arrays["seq"]), last_step=int(arrays["last_step"]), rows=rows, state=state
    )


def journal_path(path: str | os.PathLike[str]) -> str:
    """Return the path of the journal that belongs to the record at `path`."""
    return os.fspath(path) + ".journal"


def new_entries(path: str, entries: list[JournalEntry], file_seq: int) -> list[JournalEntry]:
    """Return the journal entries not yet in the netCDF file, stopping at a gap in numbering."""
    selected: list[JournalEntry] = []
    expected = file_seq + 1
    for entry in entries:
        if entry.seq <= file_seq:
            continue
        if entry.seq != expected:
            logger.warning(
                "journal of %s jumps from flush %d to %d; ignoring the rest",
                path,
                expected - 1,
                entry.seq,
            )
            break
        selected.append(entry)
        expected += 1
    return selected


def encode_state(state: dict[str, np.ndarray]) -> bytes:
    """Encode a resume state as npz bytes."""
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **state)
    return buffer.getvalue()


def decode_state(data: bytes) -> dict[str, np.ndarray]:
    """Decode a resume state from npz bytes."""
    archive = np.load(io.BytesIO(data), allow_pickle=False)
    return {key: archive[key] for key in archive.files}


class JournalFile:
    """An open journal that appends entries durably from a known-good offset."""

    def __init__(self, path: str, valid_length: int) -> None:
        self.path = path
        self.length = valid_length
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def append(self, record: bytes) -> None:
        """Write one encoded record after the valid prefix and fsync it.

        A failed earlier write may have left a partial record; truncating to the valid length
        first keeps later records readable.
        """
        os.ftruncate(self._fd, self.length)
        os.lseek(self._fd, self.length, os.SEEK_SET)
        view = memoryview(record)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.length += len(record)

    def rollback(self) -> None:
        """Cut the file back to its valid prefix after a failed append (best effort)."""
        try:
            os.ftruncate(self._fd, self.length)
        except OSError:
            pass

    def clear(self) -> None:
        """Empty the journal once its entries are in the netCDF file."""
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.length = 0

    def close(self) -> None:
        """Close the file descriptor."""
        os.close(self._fd)
