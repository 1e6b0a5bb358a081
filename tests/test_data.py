"""Tests of the datasets: the spiral formula, bundled and user files, splits and file errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray

from dynscope.config import RecordConfig
from dynscope.data import (
    DATASETS,
    load_dataset,
    load_file,
    make_spiral,
    split_dataset,
    validation_seed,
)

DATA = Path(__file__).resolve().parent.parent / "data"


def config_for(dataset: str | Path, **options) -> RecordConfig:
    return RecordConfig(dataset=str(dataset), **options)


# --- spiral ----------------------------------------------------------------------------------


def test_spiral_noiseless_on_arms():
    classes, points, revolutions = 4, 25, 3.0
    x, y = make_spiral(classes, points, revolutions, noise=0.0, seed=0)
    for arm in range(classes):
        radius = np.linspace(0, 1, points)
        start = 2 * np.pi * arm / classes
        angle = np.linspace(start, start + revolutions * np.pi, points)
        expected = np.column_stack([radius * np.cos(angle), radius * np.sin(angle)])
        np.testing.assert_allclose(x[y == arm], expected, rtol=0, atol=1e-15)


def test_spiral_noise_is_angular():
    x, y = make_spiral(3, 50, 4.0, noise=0.5, seed=1)
    radius = np.hypot(x[:, 0], x[:, 1])
    for arm in range(3):
        np.testing.assert_allclose(radius[y == arm], np.linspace(0, 1, 50), atol=1e-14)


def test_spiral_noise_matches_formula():
    x, _ = make_spiral(2, 10, 4.0, noise=0.3, seed=7)
    rng = np.random.default_rng(7)
    radius = np.linspace(0, 1, 10)
    angle = np.linspace(0, 4 * np.pi, 10) + 0.3 * rng.standard_normal(10)
    expected = np.column_stack([radius * np.cos(angle), radius * np.sin(angle)])
    np.testing.assert_allclose(x[:10], expected, rtol=0, atol=1e-15)


def test_spiral_shapes_and_labels():
    x, y = make_spiral(5, 40)
    assert x.shape == (200, 2)
    assert x.dtype == np.float64
    assert y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y), np.full(5, 40))


def test_spiral_dataset_validation_draw():
    dataset = load_dataset(config_for("spiral", seed=3))
    x_val, _ = make_spiral(seed=validation_seed(3))
    assert dataset.x_train.shape == (300, 2)
    assert dataset.x_val.shape == (300, 2)
    assert dataset.num_classes == 3
    np.testing.assert_array_equal(dataset.x_val, x_val)
    assert not np.allclose(dataset.x_train, dataset.x_val)


def test_spiral_dataset_deterministic():
    first = load_dataset(config_for("spiral", seed=4, classes=4, points_per_class=30))
    again = load_dataset(config_for("spiral", seed=4, classes=4, points_per_class=30))
    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.x_val, again.x_val)
    assert first.x_train.shape == (120, 2)


def test_validation_seed_differs():
    assert validation_seed(0) != 0
    assert validation_seed(0) != validation_seed(1)
    assert validation_seed(5) == validation_seed(5)


# --- built-in datasets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "features", "classes", "samples"),
    [
        ("moons", 2, 2, 200),
        ("circles", 2, 2, 200),
        ("digits", 64, 10, 1797),
        ("iris", 4, 3, 150),
        ("wine", 13, 3, 178),
        ("breast_cancer", 30, 2, 569),
    ],
)
def test_named_dataset_shapes(name, features, classes, samples):
    dataset = load_dataset(config_for(name, points_per_class=100))
    assert dataset.num_features == features
    assert dataset.num_classes == classes
    assert len(dataset.feature_names) == features
    assert dataset.x_train.dtype == np.float64
    assert dataset.y_train.dtype == np.int64
    np.testing.assert_array_equal(np.unique(dataset.y_train), np.arange(classes))
    np.testing.assert_array_equal(np.unique(dataset.y_val), np.arange(classes))
    if name in ("moons", "circles"):
        assert dataset.x_train.shape[0] == samples
        assert dataset.x_val.shape[0] == samples
    else:
        assert dataset.x_train.shape[0] + dataset.x_val.shape[0] == samples


def test_digits_split_stratified():
    dataset = load_dataset(config_for("digits", val_fraction=0.25, seed=2))
    assert dataset.x_val.shape[0] == 450
    train_share = np.bincount(dataset.y_train) / dataset.y_train.size
    val_share = np.bincount(dataset.y_val) / dataset.y_val.size
    np.testing.assert_allclose(train_share, val_share, atol=0.01)


def test_split_seed_changes_split():
    first = load_dataset(config_for("iris", seed=0))
    other = load_dataset(config_for("iris", seed=1))
    assert not np.array_equal(first.y_val, other.y_val)


def test_standardisation_uses_training_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(200, 3))
    y = np.repeat(np.arange(4), 50)
    dataset = split_dataset("synthetic", x, y, val_fraction=0.3, seed=0)
    raw_train = dataset.x_train * dataset.feature_scale + dataset.feature_mean
    raw_val = dataset.x_val * dataset.feature_scale + dataset.feature_mean
    np.testing.assert_allclose(dataset.feature_mean, raw_train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(dataset.feature_scale, raw_train.std(axis=0), rtol=1e-12)
    np.testing.assert_allclose(dataset.x_train.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(dataset.x_train.std(axis=0), 1.0, rtol=1e-12)
    assert np.abs(dataset.x_val.mean(axis=0)).max() > 1e-3
    recovered = np.sort(np.concatenate([raw_train, raw_val]), axis=0)
    np.testing.assert_allclose(recovered, np.sort(x, axis=0), rtol=1e-12)


def test_constant_feature_only_centred():
    x = np.column_stack([np.full(20, 5.0), np.arange(20.0)])
    y = np.tile([0, 1], 10)
    dataset = split_dataset("constant", x, y, val_fraction=0.25, seed=0)
    np.testing.assert_array_equal(dataset.x_train[:, 0], np.zeros(15))
    assert dataset.feature_scale[0] == 1.0


# --- user files ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["csv", "npz", "nc"])
def test_example_files_load(suffix):
    dataset = load_dataset(config_for(DATA / f"example_blobs.{suffix}"))
    assert dataset.num_classes == 3
    assert dataset.num_features == 4
    assert dataset.x_train.shape[0] + dataset.x_val.shape[0] == 150


def test_example_files_agree():
    loaded = [load_file(DATA / f"example_blobs.{suffix}") for suffix in ("csv", "npz", "nc")]
    for dataset in loaded[1:]:
        np.testing.assert_allclose(dataset.x_train, loaded[0].x_train, rtol=1e-10)
        np.testing.assert_array_equal(dataset.y_val, loaded[0].y_val)
    assert loaded[0].feature_names == ("f0", "f1", "f2", "f3")
    assert loaded[2].feature_names == ("f0", "f1", "f2", "f3")


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def blob_rows(labels: list[int]) -> str:
    return "".join(f"{index}.5,{2 * index}.25,{label}\n" for index, label in enumerate(labels))


def test_csv_label_column_named(tmp_path):
    labels = [0, 1, 2] * 4
    rows = "".join(f"{label},{index}.0,{-index}.0\n" for index, label in enumerate(labels))
    dataset = load_file(write_csv(tmp_path / "named.csv", "y,a,b\n" + rows))
    assert dataset.feature_names == ("a", "b")
    assert dataset.num_classes == 3
    raw = dataset.x_train * dataset.feature_scale + dataset.feature_mean
    np.testing.assert_allclose(raw[:, 0], -raw[:, 1])


def test_csv_label_last_column_default(tmp_path):
    dataset = load_file(write_csv(tmp_path / "last.csv", "a,b,c\n" + blob_rows([0, 1] * 5)))
    assert dataset.feature_names == ("a", "b")
    assert dataset.num_classes == 2


def test_csv_integral_float_labels(tmp_path):
    rows = "".join(f"{index}.0,{label}.0\n" for index, label in enumerate([0, 1] * 4))
    dataset = load_file(write_csv(tmp_path / "floats.csv", "a,label\n" + rows))
    assert dataset.y_train.dtype == np.int64


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def save_netcdf(path: Path, variables: dict) -> Path:
    xarray.Dataset(variables).to_netcdf(path)
    return path


GOOD_X = np.arange(24.0).reshape(12, 2)
GOOD_Y = np.array([0, 1, 2] * 4)


@pytest.mark.parametrize(
    ("make_file", "message"),
    [
        (lambda tmp: tmp / "absent.csv", "dataset file not found"),
        (lambda tmp: write_csv(tmp / "empty.csv", ""), "empty CSV file"),
        (lambda tmp: write_csv(tmp / "header.csv", "a,label\n"), "no samples"),
        (lambda tmp: write_csv(tmp / "one.csv", "label\n0\n1\n"), "has only 1 column"),
        (
            lambda tmp: write_csv(tmp / "ragged.csv", "a,b,label\n1,2,0\n3,1\n"),
            "line 3 .* has 2 fields but the header has 3",
        ),
        (
            lambda tmp: write_csv(tmp / "text.csv", "a,label\n1,0\nfoo,1\n"),
            "invalid feature 'foo' in column 'a', line 3",
        ),
        (
            lambda tmp: write_csv(tmp / "names.csv", "a,label\n1,0\n2,cat\n"),
            "invalid label 'cat'",
        ),
        (
            lambda tmp: write_csv(tmp / "half.csv", "a,label\n" + "1,0\n2,1.5\n" * 3),
            "non-integer label 1.5",
        ),
        (
            lambda tmp: write_csv(tmp / "negative.csv", "a,label\n" + "1,0\n2,-1\n" * 3),
            "negative label -1",
        ),
        (
            lambda tmp: write_csv(tmp / "nan.csv", "a,label\n" + "1,0\nnan,1\n" * 3),
            "NaN or infinite feature",
        ),
        (
            lambda tmp: write_csv(tmp / "inf.csv", "a,label\n" + "1,0\ninf,1\n" * 3),
            "NaN or infinite feature",
        ),
        (
            lambda tmp: write_csv(tmp / "single.csv", "a,label\n" + "1,2\n" * 6),
            "single class",
        ),
        (
            lambda tmp: write_csv(tmp / "gap.csv", "a,label\n" + "1,0\n2,2\n" * 4),
            "label 1 has no samples",
        ),
        (
            lambda tmp: write_csv(tmp / "rare.csv", "a,label\n" + "1,0\n2,1\n" * 4 + "3,2\n"),
            "class 2 has only 1 sample",
        ),
        (lambda tmp: save_npz(tmp / "nox.npz", y=GOOD_Y), "missing array 'X'"),
        (lambda tmp: save_npz(tmp / "noy.npz", X=GOOD_X), "missing array 'y'"),
        (
            lambda tmp: save_npz(tmp / "lengths.npz", X=GOOD_X[:10], y=GOOD_Y),
            "different lengths",
        ),
        (
            lambda tmp: save_npz(tmp / "flat.npz", X=GOOD_X.ravel(), y=GOOD_Y),
            "expected a 2-D array",
        ),
        (
            lambda tmp: save_npz(tmp / "strings.npz", X=GOOD_X, y=GOOD_Y.astype(str)),
            "non-integer labels",
        ),
        (
            lambda tmp: save_netcdf(tmp / "nox.nc", {"y": ("sample", GOOD_Y)}),
            "missing variable 'X'",
        ),
        (
            lambda tmp: save_netcdf(tmp / "noy.nc", {"X": (("sample", "feature"), GOOD_X)}),
            "missing variable 'y'",
        ),
        (
            lambda tmp: save_netcdf(
                tmp / "lengths.nc",
                {"X": (("sample", "feature"), GOOD_X), "y": ("label_sample", GOOD_Y[:9])},
            ),
            "different lengths",
        ),
        (lambda tmp: write_csv(tmp / "data.txt", "a,label\n1,0\n"), "unsupported dataset file"),
    ],
)
def test_bad_file_raises(tmp_path, make_file, message):
    path = make_file(tmp_path)
    with pytest.raises(ValueError, match=message) as caught:
        load_dataset(config_for(path))
    assert "\n" not in str(caught.value)


def test_class_missing_from_split(tmp_path):
    # Two samples per class but a validation part so large that stratification cannot help.
    path = write_csv(tmp_path / "small.csv", "a,b,label\n" + blob_rows([0, 1, 2, 0, 1, 2]))
    with pytest.raises(ValueError, match="val-fraction") as caught:
        load_dataset(config_for(path, val_fraction=0.9))
    assert "\n" not in str(caught.value)


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'") as caught:
        load_dataset(config_for("mnist"))
    for name in DATASETS:
        assert name in str(caught.value)
