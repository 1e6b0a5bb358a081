"""Tests of the record store: schema, round trip, journal replay, errors, resume, write failure."""

from __future__ import annotations

import json

import numpy as np

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
