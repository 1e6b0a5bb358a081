"""Tests of study files and of sweeps on a real local Dask cluster (no mocks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dynscope import store
from dynscope.sweep import Study, load_study, run_name, run_sweep, study_from_dict

TINY_RECORD = {
    "steps": 30,
    "points_per_class": 10,
    "period": 10,
    "amplitude": 5.0,
    "lr": 0.5,
    "hessian_every": 0,
    "snapshot_every": 0,
    "flush_every": 10,
}


def _study(sweep: dict, **record: object) -> Study:
    return study_from_dict({"record": {**TINY_RECORD, **record}, "sweep": sweep})


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """Start one local cluster of 2 worker processes for the module and return its address."""
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    )
    yield cluster.scheduler_address
    cluster.close()


def test_load_study_reads_grid(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text(
        '[record]\nsteps = 50\ndataset = "spiral"\n\n'
        '[sweep]\nloss = ["ce", "dce"]\nwidth = [4, 8, 16]\nlr = [1, 0.5]\n'
    )
    study = load_study(path)
    names = [point.name for point in study.points()]
    assert study.size == 12
    assert len(names) == 12
    assert names[0] == "loss-ce_width-4_lr-1.0"
    assert names[-1] == "loss-dce_width-16_lr-0.5"
    assert study.points()[0].config.lr == 1.0
    assert study.points()[-1].config.steps == 50


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"sweep": {"widht": [4]}}, "unknown option 'widht'"),
        ({"sweep": {"width": []}}, "empty list for 'width'"),
        ({"sweep": {"width": 4}}, "'width' in .*not a list"),
        ({"sweep": {"width": [4, 0]}}, "invalid grid point width-0.*invalid width 0"),
        ({"sweep": {"width": [4, "wide"]}}, "invalid width 'wide'"),
        ({"sweep": {"width": [4, 4]}}, "repeated value"),
        ({"record": {"width": 4}, "sweep": {"width": [8]}}, "'width' is in both"),
        ({"record": {"lrr": 1}}, r"invalid \[record\].*unknown option 'lrr'"),
        ({"grid": {}}, "unknown table or key 'grid'"),
        ({"sweep": {"dataset": ["a/b.csv", "a b.csv"]}}, "share the record name"),
    ],
)
def test_study_rejects_invalid_document(document: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        study_from_dict(document)


def test_load_study_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="study file not found"):
        load_study(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"loss": "dce", "width": 8, "seed": 0}, "loss-dce_width-8_seed-0"),
        ({"points_per_class": 20}, "points-per-class-20"),
        ({"lr": 1e-3}, "lr-0.001"),
        ({"dataset": "data/my set.csv"}, "dataset-data-my-set.csv"),
        ({}, "run"),
    ],
)
def test_run_name_is_filesystem_safe(params: dict, expected: str) -> None:
    assert run_name(params) == expected


def test_sweep_records_grid_on_cluster(tmp_path: Path, scheduler: str) -> None:
    study = _study({"loss": ["ce", "dce"], "width": [4, 8]})
    result = run_sweep(study, tmp_path, scheduler=scheduler, quiet=True)

    assert [run.status for run in result.runs] == ["complete"] * 4
    assert sorted(path.name for path in tmp_path.glob("*.nc")) == [
        "loss-ce_width-4.nc",
        "loss-ce_width-8.nc",
        "loss-dce_width-4.nc",
        "loss-dce_width-8.nc",
    ]
    for run in result.runs:
        record = store.open_record(run.path)
        assert record.attrs["status"] == "complete"
        assert record.attrs["width"] == run.params["width"]
        np.testing.assert_array_equal(record["step"].values, np.arange(30))

    rerun = run_sweep(study, tmp_path, scheduler=scheduler, quiet=True)
    assert all(run.skipped for run in rerun.runs)
    assert rerun.counts() == {"skipped": 4}


def test_sweep_reports_failing_point(tmp_path: Path, scheduler: str) -> None:
    missing = str(tmp_path / "missing.csv")
    study = _study({"dataset": ["spiral", missing]})
    result = run_sweep(study, tmp_path / "runs", scheduler=scheduler, quiet=True)

    statuses = {run.params["dataset"]: run.status for run in result.runs}
    failed = result.failed
    assert statuses == {"spiral": "complete", missing: "failed"}
    assert len(failed) == 1
    assert "ValueError" in (failed[0].error or "")
    assert "missing.csv" in (failed[0].error or "")


def test_sweep_ensemble_matches_single_runs(tmp_path: Path, scheduler: str) -> None:
    study = _study({"width": [4], "seed": [0, 1, 2]})
    singles = run_sweep(study, tmp_path / "single", scheduler=scheduler, ensemble=False, quiet=True)
    grouped = run_sweep(study, tmp_path / "grouped", scheduler=scheduler, quiet=True)

    assert [run.status for run in grouped.runs] == ["complete"] * 3
    for single, member in zip(singles.runs, grouped.runs, strict=True):
        expected = store.open_record(single.path)["loss"].values
        actual = store.open_record(member.path)["loss"].values
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-10)


def test_sweep_rejects_record_of_edited_study(tmp_path: Path, scheduler: str) -> None:
    from dynscope.recorder import record

    old = _study({"width": [4]})
    edited = _study({"width": [4]}, steps=40, amplitude=7.0)
    path = tmp_path / f"{old.points()[0].name}.nc"
    record(old.points()[0].config, path, quiet=True)

    with pytest.raises(ValueError, match="made with other options") as raised:
        run_sweep(edited, tmp_path, scheduler=scheduler, quiet=True)
    assert "amplitude 5.0 in the record, 7.0 in the study" in str(raised.value)
    assert "steps 30 in the record, 40 in the study" in str(raised.value)
    assert store.open_record(path).sizes["step"] == 30


def test_sweep_counts_records_of_edited_study(tmp_path: Path, scheduler: str) -> None:
    from dynscope.recorder import record

    old = _study({"width": [4, 8]})
    for point in old.points():
        record(point.config, tmp_path / f"{point.name}.nc", quiet=True)
    storage_only = _study({"width": [4, 8]}, flush_every=20)
    edited = _study({"width": [4, 8]}, lr=0.25)

    rerun = run_sweep(storage_only, tmp_path, scheduler=scheduler, quiet=True)
    with pytest.raises(ValueError, match="and 1 other records were made") as raised:
        run_sweep(edited, tmp_path, scheduler=scheduler, quiet=True)

    assert rerun.counts() == {"skipped": 2}
    assert "delete those records" in str(raised.value)


def test_sweep_that_cannot_start_creates_no_folder(tmp_path: Path) -> None:
    output = tmp_path / "runs"
    with pytest.raises(ValueError, match="invalid scheduler address"):
        run_sweep(_study({"width": [4]}), output, scheduler="nonsense", quiet=True)
    assert not output.exists()


def test_split_groups_fills_worker_threads() -> None:
    from dynscope.sweep import _group_points, _split_groups

    study = _study({"width": [4, 8], "seed": [0, 1, 2, 3, 4]})
    groups = _group_points(study.points())

    split = _split_groups(groups, 4)
    unsplit = _split_groups(groups, 2)
    singles = _split_groups(groups, 20)

    assert [len(group) for group in groups] == [5, 5]
    assert [len(group) for group in split] == [3, 2, 3, 2]
    assert [point for group in split for point in group] == study.points()
    assert unsplit == groups
    assert [len(group) for group in singles] == [1] * 10


def test_sweep_resumes_interrupted_record(
    tmp_path: Path, scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynscope.recorder import record

    study = _study({"width": [4]})
    point = study.points()[0]
    partial = tmp_path / f"{point.name}.nc"
    flush = store.RecordWriter.flush

    def flush_then_interrupt(writer: store.RecordWriter, state: dict) -> None:
        flush(writer, state)
        os.kill(os.getpid(), signal.SIGINT)

    # The recorder turns SIGINT into status "interrupted" after the step that flushed.
    monkeypatch.setattr(store.RecordWriter, "flush", flush_then_interrupt)
    interrupted = record(point.config, partial, quiet=True)
    monkeypatch.undo()

    result = run_sweep(study, tmp_path, scheduler=scheduler, quiet=True)
    record_data = store.open_record(partial)
    assert interrupted.status == "interrupted"
    assert interrupted.last_step == 9
    assert result.runs[0].status == "complete"
    assert not result.runs[0].skipped
    np.testing.assert_array_equal(record_data["step"].values, np.arange(30))
    assert "resumed" in record_data.attrs["history"]


@pytest.mark.slow
def test_sweep_survives_killed_worker(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    study = _study(
        {"width": [16, 24], "seed": [0, 1]}, steps=6000, points_per_class=40, flush_every=200
    )
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    )
    client = Client(cluster)
    killed: list[int] = []

    def kill_one_worker() -> None:
        # Wait until a run has flushed rows, so the kill lands mid-run.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            journals = list(tmp_path.glob("*.journal"))
            if journals and journals[0].stat().st_size > 0:
                break
            time.sleep(0.2)
        pids = client.run(os.getpid)
        pid = next(iter(pids.values()))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    try:
        result = run_sweep(study, tmp_path, scheduler=cluster.scheduler_address, quiet=True)
    finally:
        killer.join()
        client.close()
        cluster.close()

    assert len(killed) == 1
    assert [run.status for run in result.runs] == ["complete"] * 4
    histories = []
    for run in result.runs:
        record_data = store.open_record(run.path)
        histories.append(record_data.attrs["history"])
        np.testing.assert_array_equal(record_data["step"].values, np.arange(6000))
    assert any("resumed" in history for history in histories)


@pytest.mark.slow
def test_sweep_command_ctrl_c_leaves_resumable_records(tmp_path: Path) -> None:
    study = tmp_path / "study.toml"
    study.write_text(
        "[record]\nsteps = 30000\nhessian-every = 0\npoints-per-class = 20\n"
        "flush-every = 200\n[sweep]\nwidth = [4, 8]\nseed = [0, 1]\n"
    )
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "dynscope", "sweep", str(study), "-o", str(runs)]
    # A new session plays the terminal's part: Ctrl-C signals its whole process group. A shell
    # that starts a job in the background sets SIGINT to ignored, which the child would inherit,
    # so the child gets the default action back before it starts Python.
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        path.stat().st_size > 0 for path in runs.glob("*.journal")
    ):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    infos = [store.record_info(path) for path in sorted(runs.glob("*.nc"))]
    assert len(infos) == 4
    assert all(info.can_resume for info in infos)


def test_sweep_rejects_malformed_scheduler_address(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid scheduler address 'nonsense'.*tcp://HOST:PORT"):
        run_sweep(_study({"width": [4]}), tmp_path, scheduler="nonsense", quiet=True)
