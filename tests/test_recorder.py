"""Tests of the recorder against recomputation from the recorded parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynscope import losses, models, open_record
from dynscope.config import RecordConfig
from dynscope.data import load_dataset
from dynscope.recorder import record


def _model_at(
    config: RecordConfig, flat: np.ndarray
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    dataset = load_dataset(config)
    model = models.build_mlp(
        dataset.x_train.shape[1],
        dataset.num_classes,
        width=config.width,
        depth=config.depth,
        activation=config.activation,
        seed=config.seed,
    )
    models.assign_parameters(model, torch.as_tensor(flat))
    x = torch.as_tensor(dataset.x_train)
    y = torch.as_tensor(dataset.y_train)
    return model, x, y


def _loss_for(config: RecordConfig) -> losses.ClassificationLoss:
    return losses.make_loss(
        config.loss,
        config.classes,
        amplitude=config.amplitude,
        period=config.period,
        total_steps=config.steps,
    )


def test_record_schema_dims_and_shapes(small_record, small_config) -> None:
    ds = open_record(small_record)
    num_params = 2 * 12 + 12 + 12 * 3 + 3

    assert ds.sizes["step"] == 60
    assert ds.sizes["probe"] == 6
    assert ds.sizes["eig"] == num_params
    assert ds.sizes["label"] == 3
    assert ds["gamma"].dims == ("step", "label")
    assert ds["eigenvalues"].dims == ("probe", "eig")
    assert ds["params"].shape == (6, num_params)
    assert list(ds["probe_step"].values) == [0, 10, 20, 30, 40, 50]
    assert ds.attrs["status"] == "complete"


def test_record_variables_have_units(small_record) -> None:
    ds = open_record(small_record)

    for name in ("loss", "static_loss", "train_accuracy", "val_accuracy", "grad_norm", "gamma"):
        assert "long_name" in ds[name].attrs, name
        assert "units" in ds[name].attrs, name


def test_eigenvalues_sorted_descending(small_record) -> None:
    eigenvalues = open_record(small_record)["eigenvalues"].values

    assert np.all(np.diff(eigenvalues, axis=1) <= 0)


def test_gamma_matches_schedule(small_record, small_config) -> None:
    ds = open_record(small_record)
    expected = _loss_for(small_config)

    for step in (0, 5, 10, 25, 59):
        np.testing.assert_allclose(ds["gamma"].sel(step=step).values, expected.gamma_at(step))


def test_loss_matches_recomputation(small_record, small_config) -> None:
    ds = open_record(small_record)
    loss = _loss_for(small_config)

    for index, step in enumerate(ds["snapshot_step"].values):
        model, x, y = _model_at(small_config, ds["params"].values[index])
        value = float(loss(model(x), y, step=int(step)).detach())
        assert ds["loss"].sel(step=step).item() == pytest.approx(value, rel=1e-12)


def test_probe_matches_dense_hessian(small_record, small_config) -> None:
    ds = open_record(small_record)
    loss = _loss_for(small_config)
    step = 30
    index = list(ds["snapshot_step"].values).index(step)
    model, x, y = _model_at(small_config, ds["params"].values[index])
    flat = models.flatten_parameters(model)

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        offset = 0
        tensors = {}
        for name, parameter in model.named_parameters():
            tensors[name] = theta[offset : offset + parameter.numel()].view_as(parameter)
            offset += parameter.numel()
        outputs = torch.func.functional_call(model, tensors, (x,))
        return loss(outputs, y, step=step)

    dense = torch.autograd.functional.hessian(loss_of, flat)
    expected = np.sort(np.linalg.eigvalsh(dense.numpy()))[::-1]
    probe = list(ds["probe_step"].values).index(step)

    np.testing.assert_allclose(ds["eigenvalues"].values[probe], expected, atol=1e-10)
    assert ds["hessian_trace"].values[probe] == pytest.approx(np.trace(dense.numpy()), rel=1e-10)


def test_static_loss_gives_unit_gamma(tmp_path, small_config) -> None:
    path = tmp_path / "ce.nc"
    record(small_config.replace(loss="ce", hessian_every=0), path, quiet=True)
    ds = open_record(path)

    assert np.all(ds["gamma"].values == 1.0)
    np.testing.assert_array_equal(ds["loss"].values, ds["static_loss"].values)


def test_same_seed_same_record(tmp_path, small_config) -> None:
    config = small_config.replace(steps=30, hessian_every=15)
    record(config, tmp_path / "a.nc", quiet=True)
    record(config, tmp_path / "b.nc", quiet=True)
    first = open_record(tmp_path / "a.nc")
    second = open_record(tmp_path / "b.nc")

    for name in ("loss", "gamma", "eigenvalues", "params", "val_accuracy"):
        np.testing.assert_array_equal(first[name].values, second[name].values)


def test_divergence_keeps_finite_steps(tmp_path, small_config) -> None:
    config = small_config.replace(loss="mse", lr=100.0, steps=200, hessian_every=0)
    result = record(config, tmp_path / "diverged.nc", quiet=True)
    ds = open_record(tmp_path / "diverged.nc")

    assert result.status == "diverged"
    assert result.exit_code == 3
    assert ds.attrs["status"] == "diverged"
    assert ds.sizes["step"] == result.last_step + 1
    assert np.all(np.isfinite(ds["loss"].values))


def test_sgd_records_minibatch_loss(tmp_path, small_config) -> None:
    config = small_config.replace(optimizer="sgd", batch_size=16, momentum=0.9, hessian_every=0)
    record(config, tmp_path / "sgd.nc", quiet=True)
    ds = open_record(tmp_path / "sgd.nc")

    assert "minibatch_loss" in ds
    assert not np.allclose(ds["minibatch_loss"].values, ds["loss"].values)


def test_existing_output_needs_force(tmp_path, small_config) -> None:
    path = tmp_path / "run.nc"
    path.write_bytes(b"keep me")

    with pytest.raises(ValueError, match="pass --force"):
        record(small_config, path, quiet=True)
    assert path.read_bytes() == b"keep me"


@pytest.mark.parametrize("dataset", ["spiral", "moons", "digits", "iris", "data/example_blobs.csv"])
@pytest.mark.parametrize("loss_name", ["ce", "dce", "mse", "dmse1", "dmse2"])
def test_record_each_loss_and_dataset(tmp_path, dataset: str, loss_name: str) -> None:
    from pathlib import Path

    if dataset.startswith("data/"):
        dataset = str(Path(__file__).parent.parent / dataset)
    config = RecordConfig(
        steps=6, dataset=dataset, loss=loss_name, width=8, period=3, amplitude=4.0, lr=0.1,
        hessian_every=3, snapshot_every=3, flush_every=4,
    )  # fmt: skip
    result = record(config, tmp_path / "run.nc", quiet=True)
    ds = open_record(tmp_path / "run.nc")

    assert result.status == "complete"
    assert ds.sizes["step"] == 6
    assert np.all(np.isfinite(ds["loss"].values))
    assert np.all(np.abs(ds["gamma"].sum("label").values - ds.sizes["label"]) < 1e-12)


def test_digits_dce_has_ten_labels(tmp_path) -> None:
    config = RecordConfig(steps=3, dataset="digits", width=8, hessian_every=0, period=2)
    record(config, tmp_path / "digits.nc", quiet=True)
    ds = open_record(tmp_path / "digits.nc")

    assert ds.sizes["label"] == 10
    assert ds["gamma"].shape == (3, 10)
    assert ds["gamma"].values[1].max() > 1.0
