"""Kill a record writer with SIGKILL at random moments and check what the record keeps.

Run as a script, this file is the writer: ``python test_store_crash.py PATH STEPS FLUSH_EVERY``
resumes the record at PATH (or creates it) and appends deterministic synthetic rows, printing
``flushed STEP`` after each flush returns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

NUM_PARAMS = 2000


def step_values(step: int) -> dict[str, object]:
    """Return deterministic synthetic values of one step row."""
    return {
        "loss": np.sin(0.01 * step),
        "static_loss": np.cos(0.01 * step),
        "train_accuracy": (step % 10) / 10,
        "val_accuracy": (step % 7) / 7,
        "grad_norm": float(step) ** 0.5,
        "lr": 0.5,
        "gamma": np.array([1.0 + step % 5, 1.0, 0.5]),
    }


def run_writer(path: str, steps: int, flush_every: int) -> None:
    """Resume the record at `path` (or create it) and append rows up to `steps`."""
    from dynscope import store

    try:
        writer, state = store.RecordWriter.resume(path)
        start = int(state["next_step"])
    except store.RecordError:
        writer = store.RecordWriter.create(
            path,
            config_json=json.dumps({"steps": steps}),
            attrs={"steps": steps},
            labels=[0, 1, 2],
            num_params=NUM_PARAMS,
            num_eigs=5,
            force=True,
        )
        start = 0
    print(f"started {start}", flush=True)

    for step in range(start, steps):
        writer.append_step(step, **step_values(step))
        if step % 5 == 0:
            writer.append_probe(step, np.linspace(step, 0, 5), float(step))
        if step % 10 == 0:
            writer.append_snapshot(step, np.arange(NUM_PARAMS) * 1e-3 + step)
        if (step + 1) % flush_every == 0 or step + 1 == steps:
            writer.flush({"next_step": np.asarray(step + 1), "params": np.full(50, step)})
            print(f"flushed {step}", flush=True)
    writer.close("complete")


def start_writer(path: str, steps: int, flush_every: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, path, str(steps), str(flush_every)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def timed_run(path: str, steps: int, flush_every: int) -> float:
    """Run the writer to completion and return its wall time in seconds."""
    started = time.perf_counter()
    process = start_writer(path, steps, flush_every)
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 0, errors
    return time.perf_counter() - started


def assert_rows_match(ds, reference, last_step: int) -> None:
    """Check that `ds` holds exactly the reference rows up to its own last step."""
    steps = ds["step"].values
    assert steps[-1] >= last_step
    np.testing.assert_array_equal(steps, np.arange(steps[-1] + 1))
    expected = reference.sel(step=steps)
    np.testing.assert_array_equal(ds["loss"].values, expected["loss"].values)
    np.testing.assert_array_equal(ds["gamma"].values, expected["gamma"].values)
    count = ds.sizes["snapshot"]
    np.testing.assert_array_equal(ds["params"].values, reference["params"].values[:count])


@pytest.mark.slow
def test_sigkill_keeps_flushed_rows(tmp_path):
    from xarray.testing import assert_equal

    from dynscope import store

    steps, flush_every = 6000, 40
    startup = timed_run(str(tmp_path / "startup.nc"), 1, flush_every)
    reference_path = str(tmp_path / "reference.nc")
    work = max(timed_run(reference_path, steps, flush_every) - startup, 0.1)
    reference = store.open_record(reference_path)

    path = str(tmp_path / "killed.nc")
    rng = np.random.default_rng(12345)
    kills = 0
    while kills < 20:
        process = start_writer(path, steps, flush_every)
        if rng.random() < 0.2:
            # A kill during start-up: before the record exists, or while it is being resumed.
            time.sleep(rng.uniform(0.0, startup))
            output = ""
        else:
            # A kill after about 1/40 of the work on average, so 20 kills fit in one run.
            assert process.stdout is not None
            output = process.stdout.readline()
            time.sleep(rng.uniform(0.0, work / 20))
        process.send_signal(signal.SIGKILL)
        rest, _ = process.communicate(timeout=60)
        if process.returncode == 0:
            break
        kills += 1
        lines = (output + rest).splitlines()
        flushed = [int(line.split()[1]) for line in lines if line.startswith("flushed")]
        if not os.path.exists(path):
            assert not flushed
            continue
        ds = store.open_record(path)
        if ds.sizes["step"]:
            assert_rows_match(ds, reference, flushed[-1] if flushed else -1)
        else:
            assert not flushed

    final = start_writer(path, steps, flush_every)
    assert final.wait(timeout=300) == 0, final.stderr
    resumed = store.open_record(path)
    assert kills == 20
    assert not os.path.exists(path + ".journal")
    assert_equal(resumed, reference)
    for name in resumed.variables:
        assert resumed[name].dtype == reference[name].dtype, name


if __name__ == "__main__":
    run_writer(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
