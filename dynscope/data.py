"""Load the classification datasets that dynscope trains on, as training and validation arrays.

Three kinds of source, selected by ``config.dataset``:

- synthetic 2-D sets: ``spiral`` (C interleaved arms), ``moons`` and
  ``circles`` (scikit-learn generators, always 2 classes). The validation set is an independent
  draw of the same size with a seed derived from ``config.seed``. These are not standardised.
- real datasets bundled with scikit-learn (no download): ``digits`` (1797 8x8 images, 10
  classes), ``iris``, ``wine``, ``breast_cancer``.
- user files given by path: CSV, NPZ or netCDF; see `load_file` for the layouts.

Real and user datasets are split into training and validation parts stratified by class
(``config.val_fraction``, seeded by ``config.seed``) and standardised with the mean and standard
deviation of the training part only, so no validation statistics leak into training. Labels must
be the integers 0..C-1 and every class must appear in both parts.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn import datasets as sklearn_datasets
from sklearn.model_selection import train_test_split

from dynscope.config import RecordConfig

logger = logging.getLogger(__name__)

SYNTHETIC_DATASETS = ("spiral", "moons", "circles")
BUNDLED_DATASETS = ("digits", "iris", "wine", "breast_cancer")
DATASETS = SYNTHETIC_DATASETS + BUNDLED_DATASETS
FILE_SUFFIXES = (".csv", ".npz", ".nc")
LABEL_COLUMNS = ("label", "y")

# Second entropy word of the validation seed, so that the training and validation draws of a
# synthetic dataset come from different streams.
_VALIDATION_STREAM = 1


@dataclass(frozen=True)
class Dataset:
    """Training and validation arrays of one classification dataset.

    Attributes
    ----------
    name
        Dataset name, or the file path for a user file.
    x_train, x_val
        float64 features, shape (N, D).
    y_train, y_val
        int64 labels in 0..num_classes-1, shape (N,).
    num_classes
        Number of classes C.
    feature_names
        One name per feature column.
    feature_mean, feature_scale
        Training-part statistics used to standardise the features (``x = (raw - mean) / scale``),
        or None for the synthetic sets, which are not standardised.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    feature_names: tuple[str, ...]
    feature_mean: np.ndarray | None = None
    feature_scale: np.ndarray | None = None

    @property
    def num_features(self) -> int:
        """Number of input features D."""
        return int(self.x_train.shape[1])


def load_dataset(config: RecordConfig) -> Dataset:
    """Load the dataset that a record config names.

    Uses ``dataset``, ``seed``, ``val_fraction`` and, for the spiral, ``classes``,
    ``points_per_class``, ``revolutions`` and ``noise`` (``noise`` and ``points_per_class`` also
    apply to moons and circles).

    Raises
    ------
    ValueError
        For an unknown dataset name, or a user file that is missing or malformed; the message
        names the problem and the fix.
    """
    name = config.dataset
    if name == "spiral":
        dataset = _load_spiral(config)
    elif name in ("moons", "circles"):
        dataset = _load_two_class_generator(config)
    elif name in BUNDLED_DATASETS:
        dataset = _load_bundled(name, config.val_fraction, config.seed)
    elif Path(name).suffix.lower() in FILE_SUFFIXES or Path(name).exists():
        dataset = load_file(name, val_fraction=config.val_fraction, seed=config.seed)
    else:
        raise ValueError(
            f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} "
            f"or a path to a {', '.join(FILE_SUFFIXES)} file"
        )
    logger.info(
        "loaded dataset %s: %d training and %d validation samples, %d features, %d classes",
        dataset.name,
        dataset.x_train.shape[0],
        dataset.x_val.shape[0],
        dataset.num_features,
        dataset.num_classes,
    )
    return dataset


def make_spiral(
    classes: int = 3,
    points_per_class: int = 100,
    revolutions: float = 4.0,
    noise: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw points on a spiral with one arm per class.

    Arm j has radii ``linspace(0, 1, N)`` and angles ``linspace(2 pi j / C, 2 pi j / C +
    revolutions * pi, N)`` plus ``noise`` times a standard normal draw per point; each point is
    ``(r cos angle, r sin angle)``. The noise is angular, so every point keeps its radius.

    Parameters
    ----------
    classes
        Number of arms C >= 2.
    points_per_class
        Points per arm N >= 1.
    revolutions
        Angle swept by each arm in units of pi radians (4 gives two full turns).
    noise
        Standard deviation of the angular noise in radians.
    seed
        Seed of the noise.

    Returns
    -------
    tuple of numpy.ndarray
        ``x`` float64 (C N, 2) and ``y`` int64 (C N,), arm by arm.
    """
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"invalid classes {classes!r}: use an integer >= 2")
    if isinstance(points_per_class, bool) or not isinstance(points_per_class, int):
        raise ValueError(f"invalid points_per_class {points_per_class!r}: use an integer >= 1")
    if points_per_class < 1:
        raise ValueError(f"invalid points_per_class {points_per_class!r}: use an integer >= 1")
    if not (math.isfinite(revolutions) and revolutions > 0):
        raise ValueError(f"invalid revolutions {revolutions!r}: use a finite number above 0")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"invalid noise {noise!r}: use a finite number >= 0")

    rng = np.random.default_rng(seed)
    radius = np.linspace(0.0, 1.0, points_per_class)
    points = []
    labels = []
    for arm in range(classes):
        start = 2.0 * np.pi * arm / classes
        angle = np.linspace(start, start + revolutions * np.pi, points_per_class)
        angle = angle + noise * rng.standard_normal(points_per_class)
        points.append(np.column_stack([radius * np.cos(angle), radius * np.sin(angle)]))
        labels.append(np.full(points_per_class, arm, dtype=np.int64))
    return np.concatenate(points), np.concatenate(labels)


def validation_seed(seed: int) -> int:
    """Return the seed of the validation draw of a synthetic dataset with training seed ``seed``."""
    sequence = np.random.SeedSequence([seed, _VALIDATION_STREAM])
    return int(sequence.generate_state(1)[0])


def _load_spiral(config: RecordConfig) -> Dataset:
    x_train, y_train = make_spiral(
        config.classes, config.points_per_class, config.revolutions, config.noise, config.seed
    )
    x_val, y_val = make_spiral(
        config.classes,
        config.points_per_class,
        config.revolutions,
        config.noise,
        validation_seed(config.seed),
    )
    return Dataset("spiral", x_train, y_train, x_val, y_val, config.classes, ("x0", "x1"))


def _load_two_class_generator(config: RecordConfig) -> Dataset:
    if config.classes != 2:
        logger.info(
            "dataset %s always has 2 classes; ignoring classes=%d", config.dataset, config.classes
        )
    generator = sklearn_datasets.make_moons
    if config.dataset == "circles":
        generator = sklearn_datasets.make_circles
    arrays = []
    for seed in (config.seed, validation_seed(config.seed)):
        x, y = generator(
            n_samples=2 * config.points_per_class, noise=config.noise, random_state=seed
        )
        arrays.append((x.astype(np.float64), y.astype(np.int64)))
    (x_train, y_train), (x_val, y_val) = arrays
    return Dataset(config.dataset, x_train, y_train, x_val, y_val, 2, ("x0", "x1"))


def _load_bundled(name: str, val_fraction: float, seed: int) -> Dataset:
    loaders = {
        "digits": sklearn_datasets.load_digits,
        "iris": sklearn_datasets.load_iris,
        "wine": sklearn_datasets.load_wine,
        "breast_cancer": sklearn_datasets.load_breast_cancer,
    }
    bunch = loaders[name]()
    feature_names = tuple(str(feature) for feature in bunch.feature_names)
    return split_dataset(name, bunch.data, bunch.target, val_fraction, seed, feature_names)


def split_dataset(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    val_fraction: float,
    seed: int,
    feature_names: tuple[str, ...] | None = None,
) -> Dataset:
    """Check, split (stratified by class) and standardise features and labels.

    Parameters
    ----------
    name
        Name used in the dataset and in error messages.
    x
        Features (N, D): finite numbers.
    y
        Labels (N,): integers 0..C-1, C >= 2, every class with at least 2 samples.
    val_fraction
        Fraction of the samples in the validation part, strictly between 0 and 1.
    seed
        Seed of the split.
    feature_names
        One name per column; ``x0``, ``x1``, ... when None.

    Returns
    -------
    Dataset
        Standardised with the training part's mean and standard deviation. Features that are
        constant on the training part are only centred.
    """
    x = np.asarray(x)
    if not (0.0 < val_fraction < 1.0):
        raise ValueError(f"invalid val_fraction {val_fraction!r}: use a fraction between 0 and 1")
    if x.ndim != 2:
        raise ValueError(
            f"invalid features in {name}: expected a 2-D array (samples, features), "
            f"got shape {x.shape}"
        )
    labels = check_labels(name, y)
    if x.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features and labels in {name} have different lengths ({x.shape[0]} rows of "
            f"features, {labels.shape[0]} labels): give one label per sample"
        )
    features = _check_features(name, x)
    num_classes = int(labels.max()) + 1
    if feature_names is None:
        feature_names = tuple(f"x{index}" for index in range(features.shape[1]))
    if len(feature_names) != features.shape[1]:
        raise ValueError(
            f"{len(feature_names)} feature names for {features.shape[1]} features in {name}: "
            "give one name per feature column"
        )

    try:
        x_train, x_val, y_train, y_val = train_test_split(
            features, labels, test_size=val_fraction, stratify=labels, random_state=seed
        )
    except ValueError as error:
        raise ValueError(
            f"cannot split {name} into training and validation parts with val-fraction "
            f"{val_fraction} (scikit-learn: {error}): change val-fraction or add samples"
        ) from None
    missing = sorted(set(range(num_classes)) - set(np.unique(y_train).tolist()))
    if missing:
        raise ValueError(
            f"class {missing[0]} of {name} is missing from the training split: "
            "lower val-fraction or add samples of that class"
        )

    mean = x_train.mean(axis=0)
    scale = x_train.std(axis=0)
    scale[scale == 0] = 1.0
    return Dataset(
        name=name,
        x_train=(x_train - mean) / scale,
        y_train=y_train,
        x_val=(x_val - mean) / scale,
        y_val=y_val,
        num_classes=num_classes,
        feature_names=feature_names,
        feature_mean=mean,
        feature_scale=scale,
    )


def check_labels(name: str, y: np.ndarray) -> np.ndarray:
    """Return labels as int64 after checking that they are the integers 0..C-1 with C >= 2.

    Raises
    ------
    ValueError
        For labels that are not a 1-D array of non-negative integers, a single class, a label
        value with no samples, or a class with fewer than 2 samples (a stratified split needs 2).
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(
            f"invalid labels in {name}: expected a 1-D array (samples,), got shape {y.shape}"
        )
    if y.size == 0:
        raise ValueError(f"no samples in {name}: give at least one sample per class")
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if y.dtype.kind == "f":
        integral = np.isfinite(y) & (y == np.round(y))
        if not integral.all():
            bad = float(y[~integral][0])
            raise ValueError(f"non-integer label {bad:g} in {name}: labels must be integers 0..C-1")
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"non-integer labels of type {y.dtype} in {name}: labels must be integers 0..C-1; "
            "map class names to integers first"
        )
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"negative label {int(y.min())} in {name}: labels must be integers 0..C-1")

    counts = np.bincount(y)
    if counts.size < 2 or np.count_nonzero(counts) < 2:
        raise ValueError(
            f"single class in {name} (every label is {int(y[0])}): a classifier needs at least "
            "2 classes, so add samples of another class"
        )
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(
            f"label {int(empty[0])} has no samples in {name} but the largest label is "
            f"{counts.size - 1}: labels must be 0..C-1 with every class present; renumber them"
        )
    rare = np.flatnonzero(counts < 2)
    if rare.size:
        raise ValueError(
            f"class {int(rare[0])} has only 1 sample in {name}: each class needs at least 2 "
            "samples so that it appears in both the training and validation parts"
        )
    return y


def _check_features(name: str, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise ValueError(f"non-numeric features of type {x.dtype} in {name}: use numbers only")
    features = x.astype(np.float64)
    finite = np.isfinite(features)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise ValueError(
            f"NaN or infinite feature in {name} (sample {row}, feature {column}): remove or "
            "impute those values before loading"
        )
    return features


def load_file(path: str | Path, val_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """Load a user dataset file, split it and standardise it.

    Layouts, chosen by suffix:

    - ``.csv``: a header row, then one row per sample of numbers. The label column is the one
      named ``label``, else ``y``, else the last column; all other columns are features.
    - ``.npz``: arrays ``X`` (samples, features) and ``y`` (samples,).
    - ``.nc`` (netCDF): variables ``X(sample, feature)`` and ``y(sample)``; a string coordinate
      ``feature`` gives the feature names.

    Labels must be the integers 0..C-1 and C is the largest label plus 1.

    Raises
    ------
    ValueError
        If the file is missing or malformed; the message names the problem and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset file not found: {path}; check the path")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        x, y, names = _read_csv(path)
    elif suffix == ".npz":
        x, y, names = _read_npz(path)
    elif suffix == ".nc":
        x, y, names = _read_netcdf(path)
    else:
        raise ValueError(
            f"unsupported dataset file type {suffix!r} of {path}: use {', '.join(FILE_SUFFIXES)}"
        )
    return split_dataset(str(path), x, y, val_fraction, seed, names)


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"empty CSV file {path}: give a header row and one row per sample")
    header = [cell.strip() for cell in rows[0]]
    if len(header) < 2:
        raise ValueError(
            f"CSV file {path} has only {len(header)} column(s): give at least one feature "
            "column and a label column"
        )
    if len(rows) < 2:
        raise ValueError(f"no samples in CSV file {path}: add one row per sample below the header")

    label_column = len(header) - 1
    for candidate in LABEL_COLUMNS:
        if candidate in header:
            label_column = header.index(candidate)
            break
    values = np.empty((len(rows) - 1, len(header)))
    for row_number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(
                f"line {row_number} of {path} has {len(row)} fields but the header has "
                f"{len(header)}: give one value per column"
            )
        for column, cell in enumerate(row):
            try:
                values[row_number - 2, column] = float(cell)
            except ValueError:
                role = "label" if column == label_column else "feature"
                raise ValueError(
                    f"invalid {role} {cell.strip()!r} in column {header[column]!r}, line "
                    f"{row_number} of {path}: use numbers (labels as integers 0..C-1)"
                ) from None

    feature_columns = [column for column in range(len(header)) if column != label_column]
    names = tuple(header[column] for column in feature_columns)
    return values[:, feature_columns], values[:, label_column], names


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot read NPZ file {path} ({error}): save it with numpy.savez"
        ) from None
    with archive:
        for key in ("X", "y"):
            if key not in archive.files:
                raise ValueError(
                    f"missing array {key!r} in {path} (found {', '.join(archive.files) or 'none'})"
                    ": save features as X (samples, features) and labels as y (samples,)"
                )
        try:
            return archive["X"], archive["y"], None
        except ValueError as error:
            raise ValueError(
                f"cannot read arrays of {path} ({error}): store numeric arrays, not objects"
            ) from None


def _read_netcdf(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    import xarray

    try:
        contents = xarray.open_dataset(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot read netCDF file {path} ({error}): check that it is a netCDF file"
        ) from None
    with contents:
        for key in ("X", "y"):
            if key not in contents.variables:
                raise ValueError(
                    f"missing variable {key!r} in {path}: store features as "
                    "X(sample, feature) and labels as y(sample)"
                )
        x = contents["X"]
        y = contents["y"]
        if x.ndim != 2 or y.ndim != 1:
            raise ValueError(
                f"invalid shapes in {path}: X has dims {x.dims} and y has dims {y.dims}; "
                "use X(sample, feature) and y(sample)"
            )
        names = None
        if "feature" in contents.coords and contents["feature"].dtype.kind in "OUS":
            names = tuple(str(value) for value in contents["feature"].values)
        return x.values, y.values, names
