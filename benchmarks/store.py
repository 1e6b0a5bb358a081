"""Compare the cost of streaming rows into a record with keeping them in Python lists.

Run: ``python benchmarks/store.py``. Each variant appends one step row per step for 20,000
steps (a probe every 25 steps and a snapshot of 1,000 parameters every 100 steps, as the
default recorder does); the record variant flushes every 500 steps and closes at the end. The
script prints the median of 5 runs of each and their ratio, plus the overhead per step, to be
compared with a training step (about 1 ms for the default spiral run).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dynscope import store

STEPS = 20_000
FLUSH_EVERY = 500
NUM_LABELS = 3
NUM_PARAMS = 1_000
NUM_EIGS = 50
REPEATS = 5


def row(step: int) -> dict[str, object]:
    """Return the values of one step row."""
    return {
        "loss": 1.0 / (step + 1),
        "static_loss": 0.5 / (step + 1),
        "train_accuracy": 0.5,
        "val_accuracy": 0.4,
        "grad_norm": 1.0,
        "lr": 1.0,
        "gamma": np.ones(NUM_LABELS),
    }


def run_lists() -> float:
    """Keep the same rows in Python lists; return the wall time in seconds."""
    eigenvalues = np.linspace(10.0, 0.0, NUM_EIGS)
    params = np.zeros(NUM_PARAMS)
    started = time.perf_counter()
    rows: dict[str, list[object]] = {name: [] for name in row(0)}
    probes: list[np.ndarray] = []
    snapshots: list[np.ndarray] = []
    for step in range(STEPS):
        for name, value in row(step).items():
            rows[name].append(value)
        if step % 25 == 0:
            probes.append(eigenvalues.copy())
        if step % 100 == 0:
            snapshots.append(params.copy())
    return time.perf_counter() - started


def run_record(folder: Path) -> float:
    """Stream the rows into a record; return the wall time in seconds."""
    eigenvalues = np.linspace(10.0, 0.0, NUM_EIGS)
    params = np.zeros(NUM_PARAMS)
    started = time.perf_counter()
    writer = store.RecordWriter.create(
        folder / "bench.nc",
        config_json=json.dumps({"steps": STEPS}),
        attrs={},
        labels=list(range(NUM_LABELS)),
        num_params=NUM_PARAMS,
        num_eigs=NUM_EIGS,
        force=True,
    )
    for step in range(STEPS):
        writer.append_step(step, **row(step))
        if step % 25 == 0:
            writer.append_probe(step, eigenvalues, 1.0)
        if step % 100 == 0:
            writer.append_snapshot(step, params)
        if (step + 1) % FLUSH_EVERY == 0:
            writer.flush({"params": params, "next_step": np.asarray(step + 1)})
    writer.close("complete")
    return time.perf_counter() - started


def main() -> None:
    """Time both variants and print the medians and their ratio."""
    with tempfile.TemporaryDirectory() as folder:
        record_times = [run_record(Path(folder)) for _ in range(REPEATS)]
    list_times = [run_lists() for _ in range(REPEATS)]
    record = statistics.median(record_times)
    lists = statistics.median(list_times)
    overhead_us = (record - lists) / STEPS * 1e6
    print(f"steps: {STEPS}, flush every {FLUSH_EVERY}, median of {REPEATS} runs")
    print(f"python lists: {lists:.3f} s")
    print(f"record store: {record:.3f} s")
    print(f"ratio store / lists: {record / lists:.1f}")
    print(f"overhead per step: {overhead_us:.1f} us (a training step takes about 1000 us)")


if __name__ == "__main__":
    main()
