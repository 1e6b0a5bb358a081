"""Tests of the ensemble: each member's record against a single run with its seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dynscope import store
from dynscope.config import RecordConfig
from dynscope.ensemble import record_ensemble
from dynscope.recorder import record

TINY = RecordConfig(
    steps=30,
    points_per_class=15,
    width=6,
    loss="dce",
    amplitude=5.0,
    period=10,
    lr=0.5,
    hessian_every=10,
    snapshot_every=10,
    flush_every=10,
)

SEEDS = (0, 3, 7)


def _assert_records_match(single: Path, member: Path) -> None:
    """Check every variable of two records to 1e-10 and their attributes to equality."""
    expected = store.open_record(single)
    actual = store.open_record(member)
    assert set(actual.data_vars) == set(expected.data_vars)
    for name in expected.data_vars:
        np.testing.assert_allclose(
            actual[name].values, expected[name].values, rtol=0, atol=1e-10, err_msg=name
        )
    for key in ("config", "seed", "status", "num_params", "num_train"):
        assert actual.attrs[key] == expected.attrs[key], key


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"loss": "dmse2", "class_order": "random"},
        {"optimizer": "sgd", "batch_size": 16, "momentum": 0.5, "loss": "mse"},
        {"activation": "tanh", "depth": 2, "loss": "dmse1", "lr": 0.05},
        {"activation": "gelu", "depth": 0, "loss": "ce"},
        {"depth": 3},
        {"width": 12, "loss": "ce"},
        {"width": 12, "loss": "dmse1", "optimizer": "sgd", "batch_size": 16},
    ],
    ids=[
        "dce-gd",
        "dmse2-random-order",
        "sgd-momentum",
        "tanh-depth2",
        "linear",
        "relu-depth3",
        "factored-ce",
        "factored-sgd-dmse1",
    ],
)
def test_ensemble_member_equals_single_run(tmp_path: Path, changes: dict) -> None:
    config = TINY.replace(**changes)
    member_paths = [tmp_path / f"member-{seed}.nc" for seed in SEEDS]
    results = record_ensemble(config, SEEDS, member_paths, quiet=True)

    for seed, member_path, result in zip(SEEDS, member_paths, results, strict=True):
        single_path = tmp_path / f"single-{seed}.nc"
        record(config.replace(seed=seed), single_path, quiet=True)
        assert result.status == "complete"
        assert result.last_step == config.steps - 1
        _assert_records_match(single_path, member_path)


def test_ensemble_resume_state_equals_single(tmp_path: Path) -> None:
    config = TINY.replace(steps=20, momentum=0.9)
    paths = [tmp_path / "a.nc", tmp_path / "b.nc"]
    record_ensemble(config, (1, 2), paths, quiet=True)
    single = record(config.replace(seed=2), tmp_path / "single.nc", quiet=True)

    member_writer, member_state = store.RecordWriter.resume(paths[1])
    member_writer.close("complete")
    single_writer, single_state = store.RecordWriter.resume(single.path)
    single_writer.close("complete")
    assert set(member_state) == set(single_state)
    assert int(member_state["next_step"]) == config.steps
    np.testing.assert_allclose(member_state["params"], single_state["params"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        member_state["momentum"], single_state["momentum"], rtol=0, atol=1e-10
    )


def test_ensemble_folder_names_by_seed(tmp_path: Path) -> None:
    results = record_ensemble(TINY.replace(steps=5, hessian_every=0), (4, 2), tmp_path, quiet=True)
    assert [result.path.name for result in results] == ["seed-4.nc", "seed-2.nc"]


@pytest.mark.parametrize(
    ("seeds", "message"),
    [((), "at least one seed"), ((1, 1), "repeated seed"), ((0, -1), "invalid seed -1")],
)
def test_ensemble_rejects_bad_seeds(tmp_path: Path, seeds: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        record_ensemble(TINY, seeds, tmp_path, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_ensemble_rejects_existing_output(tmp_path: Path) -> None:
    existing = tmp_path / "seed-1.nc"
    existing.write_bytes(b"")
    with pytest.raises(ValueError, match="exists"):
        record_ensemble(TINY, (0, 1), tmp_path, quiet=True)
    assert not (tmp_path / "seed-0.nc").exists()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"loss": "dmse2", "activation": "softplus", "depth": 2},
        {"loss": "mse", "optimizer": "sgd", "batch_size": 8},
    ],
    ids=["relu-dce", "softplus-dmse2", "sgd-mse"],
)
def test_batched_mlp_step_equals_vmapped_autograd(tmp_path: Path, changes: dict) -> None:
    _assert_step_equals_vmapped_autograd(tmp_path, TINY.replace(**changes), "_mlp_step_function")


@pytest.mark.parametrize(
    "changes",
    [
        {"loss": "dce"},
        {"loss": "ce"},
        {"loss": "mse"},
        {"loss": "dmse1", "class_order": "random"},
        {"loss": "dmse2", "optimizer": "sgd", "batch_size": 8},
        {"width": 6, "dataset": "moons", "loss": "dce"},
    ],
    ids=["dce", "ce", "mse", "dmse1", "sgd-dmse2", "two-classes"],
)
def test_factored_step_equals_vmapped_autograd(tmp_path: Path, changes: dict) -> None:
    config = TINY.replace(**{"width": 12, **changes})
    _assert_step_equals_vmapped_autograd(tmp_path, config, "_factored_step_function")


@pytest.mark.parametrize(
    "changes",
    [{"activation": "tanh"}, {"depth": 2}, {"width": 8}],
    ids=["tanh", "two-hidden-layers", "narrower-than-9-rows"],
)
def test_factored_step_rejects_other_networks(tmp_path: Path, changes: dict) -> None:
    from dynscope import ensemble as ensemble_module

    config = TINY.replace(**{"width": 12, **changes})
    members = [config.replace(seed=seed).validate() for seed in SEEDS]
    built = ensemble_module._build_ensemble(
        members, [tmp_path / f"{seed}.nc" for seed in SEEDS], force=False
    )
    try:
        assert ensemble_module._factored_step_function(built) is None
    finally:
        for writer in built.writers:
            writer.close("interrupted")


def _assert_step_equals_vmapped_autograd(
    tmp_path: Path, config: RecordConfig, builder: str
) -> None:
    from dynscope import ensemble as ensemble_module

    members = [config.replace(seed=seed).validate() for seed in SEEDS]
    paths = [tmp_path / f"{seed}.nc" for seed in SEEDS]
    built = ensemble_module._build_ensemble(members, paths, force=False)
    try:
        gamma = ensemble_module._GammaBlocks(built).at(7)[1]
        x_batch, y_batch = ensemble_module._batches(built, 7)
        arguments = (
            built.params,
            built.x_train,
            built.y_train,
            built.x_val,
            built.y_val,
            gamma,
            x_batch,
            y_batch,
        )
        batched = getattr(ensemble_module, builder)(built)
        assert batched is not None

        gradients, metrics = batched(*arguments)

        expected_gradients, expected_metrics = ensemble_module._member_step_function(built)(
            *arguments
        )
        torch.testing.assert_close(
            metrics, expected_metrics, rtol=1e-12, atol=1e-12, equal_nan=True
        )
        for name, expected in expected_gradients.items():
            torch.testing.assert_close(gradients[name], expected, rtol=1e-10, atol=1e-12)
    finally:
        for writer in built.writers:
            writer.close("interrupted")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimizer": "sgd", "batch_size": 1000}, "invalid batch-size 1000"),
        ({"spectrum": "topk", "topk": 500}, "invalid topk 500"),
        ({"param_projection": 10000}, "invalid param-projection 10000"),
    ],
)
def test_ensemble_checks_sizes_before_files(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        record_ensemble(TINY.replace(**changes), SEEDS, tmp_path, quiet=True)

    assert list(tmp_path.iterdir()) == []


def test_ensemble_checks_open_file_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (100, 100))
    with pytest.raises(
        ValueError, match=r"about 116 files open, above this process's limit of 100"
    ):
        record_ensemble(TINY, range(50), tmp_path, quiet=True)
    assert list(tmp_path.iterdir()) == []
