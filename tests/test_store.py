"""Tests of the record store: schema, round trip, journal replay, errors, resume, write failure."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dynscope import store

NUM_LABELS = 3
NUM_PARAMS = 7
NUM_EIGS = 4


def step_values(step: int) -> dict[str, object]:
    """Return deterministic synthetic values of one step row."""
    return {
        "loss": 1.0 / (step + 1),
        "static_loss": 0.5 / (step + 1),
        "train_accuracy": (step % 10) / 10,
        "val_accuracy": (step % 7) / 7,
        "grad_norm": float(step) ** 0.5,
        "lr": 0.1,
        "gamma": np.array([1.0 + step, 1.0, 2.0 - step / 1000]),
    }


def create_writer(path, **options) -> store.RecordWriter:
    """Create a small record with the test's sizes."""
    options.setdefault("force", False)
    return store.RecordWriter.create(
        path,
        config_json=json.dumps({"lr": 0.1, "width": 4, "seed": 0}),
        attrs={"lr": 0.1, "width": 4, "seed": 0, "loss": "dce"},
        labels=list(range(NUM_LABELS)),
        num_params=NUM_PARAMS,
        num_eigs=NUM_EIGS,
        **options,
    )


def write_steps(writer: store.RecordWriter, steps: range) -> None:
    """Append synthetic rows: a step row each step, a probe every 5, a snapshot every 10."""
    for step in steps:
        writer.append_step(step, **step_values(step))
        if step % 5 == 0:
            writer.append_probe(step, np.arange(NUM_EIGS, 0, -1) * float(step), 2.0 * step)
        if step % 10 == 0:
            writer.append_snapshot(step, np.arange(NUM_PARAMS) + float(step))


def test_round_trip_values(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(30))
    writer.flush({"next_step": np.asarray(30)})
    writer.close("complete")

    ds = store.open_record(path)
    np.testing.assert_array_equal(ds["step"].values, np.arange(30))
    np.testing.assert_array_equal(ds["loss"].values, [1.0 / (s + 1) for s in range(30)])
    np.testing.assert_array_equal(ds["gamma"].values[7], step_values(7)["gamma"])
    np.testing.assert_array_equal(ds["probe_step"].values, np.arange(0, 30, 5))
    np.testing.assert_array_equal(ds["eigenvalues"].values[2], [40.0, 30.0, 20.0, 10.0])
    np.testing.assert_array_equal(ds["params"].values[1], np.arange(NUM_PARAMS) + 10.0)
    assert ds.attrs["status"] == "complete"


def test_schema_dims_and_dtypes(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(12))
    writer.flush({})
    writer.close("complete")

    ds = store.open_record(path)
    assert dict(ds.sizes) == {
        "step": 12,
        "label": NUM_LABELS,
        "probe": 3,
        "eig": NUM_EIGS,
        "snapshot": 2,
        "param": NUM_PARAMS,
    }
    assert ds["gamma"].dims == ("step", "label")
    assert ds["eigenvalues"].dims == ("probe", "eig")
    assert ds["params"].dims == ("snapshot", "param")
    for name in ("loss", "static_loss", "eigenvalues", "hessian_trace", "gamma", "params"):
        assert ds[name].dtype == np.float64, name
    for name in ("step", "probe_step", "snapshot_step", "label"):
        assert ds[name].dtype == np.int64, name


def test_schema_units_and_long_names(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(5))
    writer.close("complete")

    ds = store.open_record(path)
    for name, variable in ds.variables.items():
        assert "units" in variable.attrs, name
        assert variable.attrs.get("long_name"), name


def test_schema_attributes(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    writer.close("diverged")

    attrs = store.open_record(path).attrs
    assert attrs["Conventions"] == "CF-1.10"
    assert attrs["status"] == "diverged"
    assert json.loads(attrs["config"])["width"] == 4
    assert attrs["width"] == 4
    assert attrs["loss"] == "dce"
    assert "created" in attrs["history"]
    assert "closed with status diverged" in attrs["history"]
    assert attrs["python_version"]
    assert attrs["dynscope_version"]
    assert "torch_version" in attrs


def test_file_chunking_and_compression(tmp_path):
    netCDF4 = pytest.importorskip("netCDF4")
    for level in (0, 4):
        path = tmp_path / f"run{level}.nc"
        writer = create_writer(path, compression=level)
        write_steps(writer, range(3))
        writer.close("complete")
        with netCDF4.Dataset(path) as ds:
            for name, variable in ds.variables.items():
                if variable.dimensions and ds.dimensions[variable.dimensions[0]].isunlimited():
                    assert variable.chunking() != "contiguous", name
                assert variable.filters()["zlib"] is (level > 0), name


def test_float32_param_dtype(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path, param_dtype="float32")
    write_steps(writer, range(11))
    writer.close("complete")

    ds = store.open_record(path)
    assert ds["params"].dtype == np.float32
    assert ds["eigenvalues"].dtype == np.float64
    np.testing.assert_array_equal(ds["params"].values[1], np.arange(NUM_PARAMS) + 10.0)


def test_probe_extras_padded(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    writer.append_probe(0, np.array([3.0, 1.0]), 4.0)
    writer.flush({})
    vectors = np.eye(2, NUM_PARAMS)
    writer.append_probe(5, np.array([2.0]), 2.0, top_eigenvectors=vectors)
    writer.flush({})

    live = store.open_record(path)
    writer.close("complete")
    closed = store.open_record(path)
    for ds in (live, closed):
        np.testing.assert_array_equal(ds["eigenvalues"].values[0], [3.0, 1.0, np.nan, np.nan])
        assert np.isnan(ds["top_eigenvectors"].values[0]).all()
        np.testing.assert_array_equal(ds["top_eigenvectors"].values[1], vectors)


def test_append_step_rejects_bad_rows(tmp_path):
    writer = create_writer(tmp_path / "run.nc")
    writer.append_step(3, **step_values(3))
    with pytest.raises(ValueError, match="must exceed"):
        writer.append_step(3, **step_values(3))
    with pytest.raises(ValueError, match="gamma shape"):
        writer.append_step(4, **(step_values(4) | {"gamma": np.ones(2)}))
    with pytest.raises(ValueError, match="unknown step values"):
        writer.append_step(4, **(step_values(4) | {"accuracy": 1.0}))
    with pytest.raises(ValueError, match="snapshot shape"):
        writer.append_snapshot(4, np.ones(NUM_PARAMS + 1))
    with pytest.raises(ValueError, match="too many eigenvalues"):
        writer.append_probe(4, np.ones(NUM_EIGS + 1), 1.0)


def test_create_existing_needs_force(tmp_path):
    path = tmp_path / "run.nc"
    create_writer(path).close("complete")
    with pytest.raises(ValueError, match="already exists"):
        create_writer(path)
    writer = create_writer(path, force=True)
    assert writer.last_flushed_step is None


def test_journal_replay_before_close(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(20))
    writer.flush({})
    write_steps(writer, range(20, 25))

    assert store.record_info(path).journal_bytes > 0
    ds = store.open_record(path)
    np.testing.assert_array_equal(ds["step"].values, np.arange(20))
    np.testing.assert_array_equal(ds["probe_step"].values, np.arange(0, 20, 5))


def test_journal_torn_tail_ignored(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(10))
    writer.flush({"next_step": np.asarray(10)})
    length = store.record_info(path).journal_bytes
    write_steps(writer, range(10, 20))
    writer.flush({"next_step": np.asarray(20)})

    journal = str(path) + ".journal"
    with open(journal, "r+b") as handle:
        handle.truncate((length + store.record_info(path).journal_bytes) // 2)
    ds = store.open_record(path)
    np.testing.assert_array_equal(ds["step"].values, np.arange(10))
    resumed, state = store.RecordWriter.resume(path)
    assert int(state["next_step"]) == 10
    assert resumed.last_flushed_step == 9


def test_journal_garbage_tail_ignored(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(10))
    writer.flush({})
    with open(str(path) + ".journal", "ab") as handle:
        handle.write(np.random.default_rng(0).bytes(300))

    ds = store.open_record(path)
    np.testing.assert_array_equal(ds["step"].values, np.arange(10))


def test_compaction_kill_no_duplicates(tmp_path):
    # A kill after the rename but before the journal is emptied leaves old journal records.
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(20))
    writer.flush({"next_step": np.asarray(20)})
    journal = str(path) + ".journal"
    with open(journal, "rb") as handle:
        leftover = handle.read()
    writer.close("interrupted")
    with open(journal, "wb") as handle:
        handle.write(leftover)
    with open(str(path) + ".tmp", "wb") as handle:
        handle.write(b"partial copy")

    ds = store.open_record(path)
    np.testing.assert_array_equal(ds["step"].values, np.arange(20))
    np.testing.assert_array_equal(ds["snapshot_step"].values, [0, 10])
    resumed, state = store.RecordWriter.resume(path)
    write_steps(resumed, range(20, 30))
    resumed.flush({"next_step": np.asarray(30)})
    resumed.close("complete")
    np.testing.assert_array_equal(store.open_record(path)["step"].values, np.arange(30))


def test_compaction_grows_geometrically(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path, compression=0)
    sizes = []
    for block in range(40):
        write_steps(writer, range(block * 100, (block + 1) * 100))
        writer.flush({"next_step": np.asarray((block + 1) * 100)})
        sizes.append(store.record_info(path).file_bytes)
    rewrites = len(set(sizes))
    assert rewrites < 20
    np.testing.assert_array_equal(store.open_record(path)["step"].values, np.arange(4000))


def test_resume_returns_last_state(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(10))
    writer.flush({"params": np.arange(3.0), "rng": np.arange(5, dtype=np.uint8)})
    write_steps(writer, range(10, 15))
    writer.flush({"params": np.arange(3.0) + 1, "rng": np.arange(5, dtype=np.uint8) + 1})
    write_steps(writer, range(15, 18))

    resumed, state = store.RecordWriter.resume(path)
    np.testing.assert_array_equal(state["params"], np.arange(3.0) + 1)
    assert state["rng"].dtype == np.uint8
    assert resumed.last_flushed_step == 14
    write_steps(resumed, range(15, 30))
    resumed.flush({})
    resumed.close("complete")
    np.testing.assert_array_equal(store.open_record(path)["step"].values, np.arange(30))


def test_resume_after_close(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(10))
    writer.flush({"next_step": np.asarray(10)})
    writer.close("interrupted")
    assert store.record_info(path).can_resume

    resumed, state = store.RecordWriter.resume(path)
    assert int(state["next_step"]) == 10
    assert resumed.last_flushed_step == 9


def test_resume_never_flushed_raises(tmp_path):
    path = tmp_path / "run.nc"
    create_writer(path)
    with pytest.raises(store.RecordError, match="never flushed"):
        store.RecordWriter.resume(path)


def test_record_info_counts(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(21))
    writer.flush({"next_step": np.asarray(21)})

    info = store.record_info(path)
    assert info.status == "running"
    assert info.last_step == 20
    assert info.num_steps == 21
    assert info.num_probes == 5
    assert info.num_snapshots == 3
    assert info.can_resume
    assert info.variable_bytes["params"] == 3 * NUM_PARAMS * 8
    assert info.variable_bytes["gamma"] == 21 * NUM_LABELS * 8
    assert info.config["width"] == 4


def assert_record_error(path, match: str) -> None:
    with pytest.raises(store.RecordError, match=match) as caught:
        store.open_record(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    with pytest.raises(store.RecordError):
        store.record_info(path)


def test_open_missing_file(tmp_path):
    assert_record_error(tmp_path / "absent.nc", "not found")


def test_open_truncated_file(tmp_path):
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(50))
    writer.close("complete")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    assert_record_error(path, "truncated")


def test_open_random_bytes(tmp_path):
    path = tmp_path / "random.nc"
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    assert_record_error(path, "not a netCDF4")


def test_open_empty_file(tmp_path):
    path = tmp_path / "empty.nc"
    path.write_bytes(b"")
    assert_record_error(path, "empty")


def test_open_non_record_netcdf(tmp_path):
    path = tmp_path / "other.nc"
    xr = pytest.importorskip("xarray")
    xr.Dataset({"x": ("t", np.arange(3.0))}).to_netcdf(path, engine="netcdf4")
    assert_record_error(path, "not a dynscope record")


def test_open_directory(tmp_path):
    assert_record_error(tmp_path, "directory")


FILE_SIZE_LIMIT_SCRIPT = """
import json, resource, signal, sys
import numpy as np
from dynscope import store

path, limit = sys.argv[1], int(sys.argv[2])
writer = store.RecordWriter.create(
    path, config_json="{}", attrs={}, labels=[0, 1], num_params=5000, num_eigs=1,
    compression=0,
)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
flushed = None
try:
    for step in range(100000):
        writer.append_step(step, loss=float(step), gamma=np.ones(2))
        writer.append_snapshot(step, np.full(5000, float(step)))
        if step % 5 == 4:
            writer.flush({"next_step": np.asarray(step + 1)})
            flushed = step
except store.RecordWriteError as error:
    print(json.dumps({"message": str(error), "flushed": flushed}))
"""


def test_write_failure_file_size_limit(tmp_path):
    path = tmp_path / "run.nc"
    result = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT_SCRIPT, str(path), str(2_000_000)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "\n" not in report["message"]
    assert str(path) in report["message"]
    assert "File too large" in report["message"]
    assert report["flushed"] is not None

    # The failing flush may have reached the journal before its compaction failed.
    ds = store.open_record(path)
    last = int(ds["step"].values[-1])
    assert last in (report["flushed"], report["flushed"] + 5)
    np.testing.assert_array_equal(ds["loss"].values, np.arange(last + 1))


def create_sweep_record(path, width: int, lr: float, steps: int) -> None:
    """Write a closed record whose config differs in width and lr."""
    writer = store.RecordWriter.create(
        path,
        config_json=json.dumps({"width": width, "lr": lr, "seed": 0}),
        attrs={"width": width, "lr": lr},
        labels=list(range(NUM_LABELS)),
        num_params=NUM_PARAMS,
        num_eigs=NUM_EIGS,
    )
    write_steps(writer, range(steps))
    writer.flush({})
    writer.close("complete")


def test_open_records_grid_padded(tmp_path):
    for width, lr, steps in ((4, 0.1, 20), (8, 0.1, 20), (4, 0.2, 20), (8, 0.2, 30)):
        create_sweep_record(tmp_path / f"w{width}_lr{lr}.nc", width, lr, steps)

    ds = store.open_records(str(tmp_path / "*.nc"))
    assert ds.sizes["width"] == 2
    assert ds.sizes["config_lr"] == 2
    assert ds.sizes["step"] == 30
    loss = ds["loss"].sel(width=4, config_lr=0.1).values
    assert np.isnan(loss[20:]).all()
    np.testing.assert_array_equal(loss[:20], [1.0 / (s + 1) for s in range(20)])
    assert json.loads(ds.attrs["sweep_dims"]) == {"width": "width", "config_lr": "lr"}


def test_open_records_sparse_grid(tmp_path):
    create_sweep_record(tmp_path / "a.nc", 4, 0.1, 10)
    create_sweep_record(tmp_path / "b.nc", 8, 0.2, 10)
    writer = store.RecordWriter.create(
        tmp_path / "c.nc",
        config_json=json.dumps({"width": 4, "lr": 0.2, "seed": 0}),
        attrs={},
        labels=list(range(NUM_LABELS)),
        num_params=NUM_PARAMS,
        num_eigs=NUM_EIGS,
    )
    write_steps(writer, range(5))
    writer.flush({})

    # c.nc is still open, so its rows are only in the journal.
    ds = store.open_records([tmp_path / "a.nc", tmp_path / "b.nc", tmp_path / "c.nc"])
    assert ds.sizes["width"] == 2
    assert int(ds["step"].values[-1]) == 9
    assert np.isnan(ds["loss"].sel(width=8, config_lr=0.1).values).all()
    running = ds["loss"].sel(width=4, config_lr=0.2).values
    assert running[4] == 1.0 / 5
    assert np.isnan(running[5:]).all()


def test_second_process_cannot_write(tmp_path) -> None:
    path = tmp_path / "run.nc"
    writer = create_writer(path)
    write_steps(writer, range(3))
    writer.flush({"step": np.asarray(3)})
    script = (
        "import sys\n"
        "from dynscope import store\n"
        "try:\n"
        "    store.RecordWriter.resume(sys.argv[1])\n"
        "except store.RecordError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    writer.close("complete")
    lock_left = (tmp_path / "run.nc.lock").exists()
    after_close = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )

    assert "being written by another process" in result.stdout
    assert "being written by another process" not in after_close.stdout
    assert not lock_left
