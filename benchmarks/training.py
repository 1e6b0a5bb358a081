"""Measure recording speed on the spiral network against named baselines in the same run.

Baselines and ratios printed (medians of --repeats runs):
- store overhead: `record` with probes off against the same training loop writing to a writer
  that discards rows (target: at most 1.10);
- probe cost: `record` with a full spectrum every 25 steps against probes off (target: at most
  3.0 for the spiral network).

Usage: python benchmarks/training.py [--steps 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynscope import recorder
from dynscope.config import RecordConfig


class DiscardingWriter:
    """A writer with the store's interface that keeps nothing (the no-store baseline)."""

    path = Path("/dev/null")

    def append_step(self, step: int, **values: Any) -> None:
        pass

    def append_probe(self, step: int, eigenvalues: np.ndarray, trace: float, **extras: Any) -> None:
        pass

    def append_snapshot(self, step: int, params: np.ndarray) -> None:
        pass

    def flush(self, state: dict[str, np.ndarray]) -> None:
        pass

    def close(self, status: str) -> None:
        pass


def time_without_store(config: RecordConfig) -> float:
    run = recorder._build_run(config)
    started = time.perf_counter()
    recorder._train(run, DiscardingWriter(), 0, None, {"name": None}, quiet=True)  # type: ignore[arg-type]
    return time.perf_counter() - started


def time_record(config: RecordConfig) -> float:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        recorder.record(config, Path(folder) / "run.nc", quiet=True)
        return time.perf_counter() - started


def median_time(function: Any, config: RecordConfig, repeats: int) -> float:
    return statistics.median(function(config) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    base = RecordConfig(steps=args.steps, flush_every=500, snapshot_every=0)
    probes_off = base.replace(hessian_every=0)
    probes_on = base.replace(hessian_every=25)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, steps {args.steps}")
    no_store = median_time(time_without_store, probes_off, args.repeats)
    with_store = median_time(time_record, probes_off, args.repeats)
    with_probes = median_time(time_record, probes_on, max(args.repeats // 2, 1))

    rows = [
        ("training loop without store", no_store),
        ("record, probes off", with_store),
        ("record, full spectrum every 25", with_probes),
    ]
    for name, seconds in rows:
        print(f"{name:32s}: {seconds:8.3f} s  ({args.steps / seconds:7.0f} steps/s)")
    print(f"{'store overhead ratio':32s}: {with_store / no_store:8.3f}  (target <= 1.10)")
    print(f"{'probe cost ratio':32s}: {with_probes / with_store:8.3f}  (target <= 3.0)")


if __name__ == "__main__":
    main()
