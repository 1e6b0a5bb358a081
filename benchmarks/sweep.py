"""Measure the two ways dynscope scales out: seed ensembles and Dask workers.

Baselines and ratios printed (medians of --repeats runs, torch limited to one thread per
process so that the comparisons do not depend on intra-op threading):
- ensemble: `record_ensemble` of 16 seeds against 16 sequential `record` calls (spiral, widths
  16 and 100, probes off; target: at least 5x faster);
- workers: `run_sweep` of a CPU-bound grid of 4 seeds, each run alone (no ensembles), on 2
  worker processes against 1 (target: at least 1.6x faster). The clusters are started and their
  workers have imported dynscope before the clock starts, so the ratio measures the runs, not
  the start-up.

Usage: python benchmarks/sweep.py [--steps 500] [--widths 16,100] [--grid-steps 1500] [--repeats 3]
(--grid-steps 0 skips the workers' grid)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from dynscope import recorder
from dynscope.config import RecordConfig
from dynscope.ensemble import record_ensemble
from dynscope.sweep import run_sweep, study_from_dict

SEEDS = tuple(range(16))


def median_seconds(action: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_sequential(config: RecordConfig) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for seed in SEEDS:
            recorder.record(config.replace(seed=seed), Path(folder) / f"{seed}.nc", quiet=True)


def time_ensemble(config: RecordConfig) -> None:
    with tempfile.TemporaryDirectory() as folder:
        record_ensemble(config, SEEDS, folder, quiet=True)


def time_grid(grid_steps: int, workers: int, repeats: int) -> float:
    from distributed import Client, LocalCluster

    study = study_from_dict(
        {
            "record": {"steps": grid_steps, "hessian_every": 0, "snapshot_every": 0},
            "sweep": {"seed": [0, 1, 2, 3]},
        }
    )
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        host="127.0.0.1",
    )
    client = Client(cluster)
    client.run(lambda: __import__("dynscope.recorder"))

    def action() -> None:
        with tempfile.TemporaryDirectory() as folder:
            run_sweep(
                study, folder, scheduler=cluster.scheduler_address, ensemble=False, quiet=True
            )

    try:
        return median_seconds(action, repeats)
    finally:
        client.close()
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=500, help="Steps of each ensemble run.")
    parser.add_argument(
        "--grid-steps", type=int, default=1500, help="Steps of each grid run (0: no grid)."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Repeats per measurement.")
    parser.add_argument(
        "--widths",
        default="16,100",
        help="Hidden-layer widths of the ensemble runs, comma-separated.",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, load average at start: {os.getloadavg()[0]:.2f}")

    for width in (int(value) for value in args.widths.split(",")):
        config = RecordConfig(steps=args.steps, width=width, hessian_every=0)
        time_ensemble(config.replace(steps=2))  # imports and first-call set-up
        # Alternate the two so that a slow spell of this shared machine hits both.
        sequential_times = []
        ensemble_times = []
        for _ in range(args.repeats):
            sequential_times.append(median_seconds(partial(time_sequential, config), 1))
            ensemble_times.append(median_seconds(partial(time_ensemble, config), 1))
        sequential = statistics.median(sequential_times)
        ensemble = statistics.median(ensemble_times)
        ratios = ", ".join(
            f"{s / e:.2f}" for s, e in zip(sequential_times, ensemble_times, strict=True)
        )
        print(f"width {width}: 16 sequential runs of {args.steps} steps: {sequential:.2f} s")
        print(f"width {width}: ensemble of 16 seeds: {ensemble:.2f} s")
        print(f"width {width}: ensemble speed-up {sequential / ensemble:.2f}x (target >= 5)")
        print(f"width {width}: speed-up of each repeat: {ratios}")

    if args.grid_steps == 0:
        return
    one = time_grid(args.grid_steps, 1, args.repeats)
    two = time_grid(args.grid_steps, 2, args.repeats)
    print(f"grid of 4 runs ({args.grid_steps} steps) on 1 worker:  {one:.2f} s")
    print(f"grid of 4 runs ({args.grid_steps} steps) on 2 workers: {two:.2f} s")
    print(f"worker speed-up: {one / two:.2f}x (target >= 1.6)")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
