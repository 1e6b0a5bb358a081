"""Write the example user dataset files in this folder: one blob dataset as CSV, NPZ and netCDF.

The three files hold the same 150 samples: 3 Gaussian blobs in 4 features, 50 per class, from
scikit-learn's make_blobs with random_state 0, rounded to 4 decimals. So ``--dataset
data/example_blobs.csv`` and the .npz and .nc variants train on the same data. Run from anywhere:
``python data/make_examples.py``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import xarray
from sklearn.datasets import make_blobs

FOLDER = Path(__file__).resolve().parent
FEATURES = ("f0", "f1", "f2", "f3")


def make_blobs_dataset() -> tuple[np.ndarray, np.ndarray]:
    """Draw the example features (150, 4), rounded to 4 decimals, and labels 0..2."""
    x, y = make_blobs(n_samples=150, n_features=len(FEATURES), centers=3, random_state=0)
    return np.round(x, 4), y.astype(np.int64)


def write_examples(folder: Path = FOLDER) -> None:
    """Write example_blobs.csv, example_blobs.npz and example_blobs.nc into a folder."""
    x, y = make_blobs_dataset()

    with (folder / "example_blobs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*FEATURES, "label"])
        for features, label in zip(x, y, strict=True):
            writer.writerow([f"{value:.4f}" for value in features] + [int(label)])

    np.savez(folder / "example_blobs.npz", X=x, y=y)

    contents = xarray.Dataset(
        {
            "X": (("sample", "feature"), x, {"long_name": "features", "units": "1"}),
            "y": (("sample",), y, {"long_name": "class label", "units": "1"}),
        },
        coords={"feature": list(FEATURES)},
        attrs={"title": "dynscope example dataset: 3 Gaussian blobs in 4 features"},
    )
    contents.to_netcdf(folder / "example_blobs.nc")


if __name__ == "__main__":
    write_examples()
