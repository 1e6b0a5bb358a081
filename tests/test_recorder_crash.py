"""Kill a real recording with SIGKILL at random moments, then resume it to the end."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dynscope import open_record, store

FLAGS = [
    "--steps", "1500", "--points-per-class", "20", "--width", "12", "--period", "100",
    "--amplitude", "5", "--lr", "0.5", "--hessian-every", "25", "--snapshot-every", "25",
    "--flush-every", "50", "--quiet",
]  # fmt: skip
FLUSH_EVERY = 50
COMPARED = ("loss", "static_loss", "grad_norm", "val_accuracy", "gamma", "eigenvalues", "params")


def _command(output: Path, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "dynscope.cli", "record"]
    if resume:
        return [*base, "--resume", "--quiet", "-o", str(output)]
    return [*base, *FLAGS, "--force", "-o", str(output)]


def _is_complete(output: Path) -> bool:
    try:
        return store.record_info(output).status == "complete"
    except store.RecordError:
        return False


def _can_resume(output: Path) -> bool:
    if not output.exists():
        return False
    try:
        return store.record_info(output).can_resume
    except store.RecordError:
        return False


@pytest.mark.slow
def test_sigkill_then_resume_matches_full_run(tmp_path: Path) -> None:
    reference_path = tmp_path / "reference.nc"
    subprocess.run(_command(reference_path, resume=False), check=True, timeout=300)
    reference = open_record(reference_path)
    output = tmp_path / "killed.nc"
    chooser = random.Random(20)

    for _ in range(20):
        if _is_complete(output):
            break  # a kill came after the last step; the final check below still runs
        process = subprocess.Popen(_command(output, resume=_can_resume(output)))
        time.sleep(chooser.uniform(0.3, 3.0))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        if not output.exists():
            continue

        record = open_record(output)
        steps = record.sizes["step"]
        assert steps % FLUSH_EVERY == 0 or steps == 1500
        np.testing.assert_array_equal(record["step"].values, np.arange(steps))
        for name in ("loss", "gamma"):
            np.testing.assert_array_equal(
                record[name].values, reference[name].values[:steps], err_msg=name
            )

    if not _is_complete(output):
        subprocess.run(_command(output, resume=_can_resume(output)), check=True, timeout=300)

    final = open_record(output)
    assert final.attrs["status"] == "complete"
    for name in COMPARED:
        np.testing.assert_array_equal(final[name].values, reference[name].values, err_msg=name)
