"""The sweep table, seed statistics and mean curves against the records they come from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dynscope.analysis.report import analyze_runs, format_summary
from dynscope.analysis.sweeps import mean_curves, seed_statistics, sweep_table
from dynscope.config import RecordConfig
from dynscope.store import open_record

WIDTHS = (4, 8)
LOSSES = ("ce", "dce")
SEEDS = (0, 1)
TINY = RecordConfig(
    steps=20,
    points_per_class=10,
    amplitude=5.0,
    period=10,
    lr=0.5,
    hessian_every=10,
    snapshot_every=0,
    flush_every=10,
)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int, int], Path]:
    """Record a 2 losses x 2 widths x 2 seeds grid of 20-step runs; key (loss, width, seed)."""
    import torch

    from dynscope.recorder import record

    # One torch thread: on a loaded 2-core machine a second thread made one of these runs take
    # 1.6 s instead of 0.1 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("sweep")
    paths = {}
    try:
        for loss in LOSSES:
            for width in WIDTHS:
                for seed in SEEDS:
                    path = folder / f"loss-{loss}_width-{width}_seed-{seed}.nc"
                    record(TINY.replace(loss=loss, width=width, seed=seed), path, quiet=True)
                    paths[(loss, width, seed)] = path
    finally:
        torch.set_num_threads(threads)
    return paths


@pytest.fixture(scope="module")
def table(records: dict[tuple[str, int, int], Path]) -> xr.Dataset:
    return sweep_table(list(records.values()))


def _relabel(path: Path, **options: object) -> xr.Dataset:
    """Open a record and change options in its config, as if it had been run with them."""
    dataset = open_record(path)
    config = json.loads(dataset.attrs["config"])
    config.update(options)
    dataset.attrs["config"] = json.dumps(config)
    dataset.attrs.update(options)
    dataset.attrs["source"] = str(path)
    return dataset


def test_table_dims_are_swept_options(table: xr.Dataset) -> None:
    assert table["final_val_accuracy"].dims == ("loss", "width", "seed")
    assert table["loss"].values.tolist() == list(LOSSES)
    assert table["width"].values.tolist() == list(WIDTHS)
    assert table["seed"].values.tolist() == list(SEEDS)


def test_table_matches_each_record(
    records: dict[tuple[str, int, int], Path], table: xr.Dataset
) -> None:
    for (loss, width, seed), path in records.items():
        run = table.sel(loss=loss, width=width, seed=seed)
        dataset = open_record(path)
        assert run["final_val_accuracy"] == dataset["val_accuracy"].values[-1], path
        assert run["final_train_accuracy"] == dataset["train_accuracy"].values[-1], path
        assert run["final_static_loss"] == dataset["static_loss"].values[-1], path
        assert run["final_loss"] == dataset["loss"].values[-1], path
        assert run["final_lambda_max"] == dataset["eigenvalues"].values[-1, 0], path
        assert run["final_step"] == TINY.steps - 1, path
        assert run["status"] == "complete", path
        assert run["source"] == str(path), path


def test_table_variables_have_units(table: xr.Dataset) -> None:
    for name, variable in table.data_vars.items():
        assert "long_name" in variable.attrs, name
        if variable.dtype.kind == "f":
            assert "units" in variable.attrs, name


def test_seed_statistics_match_numpy(table: xr.Dataset) -> None:
    statistics = seed_statistics(table)
    for name in ("final_val_accuracy", "final_static_loss", "final_lambda_max"):
        values = table[name].values
        np.testing.assert_allclose(statistics[f"{name}_mean"].values, values.mean(axis=-1))
        np.testing.assert_allclose(statistics[f"{name}_std"].values, values.std(axis=-1, ddof=1))
        assert (statistics[f"{name}_count"].values == len(SEEDS)).all(), name
        assert statistics[f"{name}_mean"].attrs["units"] == "1", name


def test_seed_statistics_reject_missing_seed(table: xr.Dataset) -> None:
    with pytest.raises(ValueError, match="seed"):
        seed_statistics(table.isel(seed=0, drop=True))


def test_single_seed_grid_statistics(records: dict[tuple[str, int, int], Path]) -> None:
    single = [path for (_, _, seed), path in records.items() if seed == 0]
    statistics = seed_statistics(sweep_table(single))
    assert statistics["final_val_accuracy_mean"].dims == ("loss", "width")
    assert (statistics["final_val_accuracy_count"].values == 1).all()
    assert np.isnan(statistics["final_val_accuracy_std"].values).all()


def test_missing_run_leaves_nan(records: dict[tuple[str, int, int], Path]) -> None:
    kept = [path for key, path in records.items() if key != ("dce", 8, 1)]
    table = sweep_table(kept)
    statistics = seed_statistics(table)
    missing = table.sel(loss="dce", width=8, seed=1)
    assert np.isnan(missing["final_val_accuracy"].item())
    assert missing["status"] == "missing"
    assert statistics["final_val_accuracy_count"].sel(loss="dce", width=8) == 1
    assert statistics["final_val_accuracy_count"].sel(loss="ce", width=8) == 2


def test_repeated_run_rejected(records: dict[tuple[str, int, int], Path]) -> None:
    path = records[("ce", 4, 0)]
    with pytest.raises(ValueError, match="same swept options"):
        sweep_table([path, path])


def test_empty_sweep_rejected() -> None:
    with pytest.raises(ValueError, match="no records"):
        sweep_table([])


def test_record_without_probes_has_nan(records: dict[tuple[str, int, int], Path]) -> None:
    datasets = [
        open_record(path).drop_vars(["eigenvalues", "probe_step", "hessian_trace"])
        for path in records.values()
    ]
    table = sweep_table(datasets)
    assert np.isnan(table["final_lambda_max"].values).all()


def test_mean_loss_curve_matches_numpy(records: dict[tuple[str, int, int], Path]) -> None:
    curves = mean_curves(list(records.values()), "loss")
    for loss in LOSSES:
        for width in WIDTHS:
            runs = np.stack(
                [open_record(records[(loss, width, seed)])["loss"].values for seed in SEEDS]
            )
            point = curves.sel(loss=loss, width=width)
            np.testing.assert_allclose(point["loss_mean"].values, runs.mean(axis=0))
            np.testing.assert_allclose(point["loss_std"].values, runs.std(axis=0, ddof=1))
    assert curves["step"].values.tolist() == list(range(TINY.steps))


def test_mean_lambda_max_matches_numpy(records: dict[tuple[str, int, int], Path]) -> None:
    curves = mean_curves(list(records.values()), "lambda_max")
    runs = np.stack(
        [open_record(records[("dce", 8, seed)])["eigenvalues"].values[:, 0] for seed in SEEDS]
    )
    point = curves.sel(loss="dce", width=8)
    np.testing.assert_allclose(point["lambda_max_mean"].values, runs.mean(axis=0))
    assert curves["probe_step"].values.tolist() == [0, 10]
    assert (point["lambda_max_count"].values == len(SEEDS)).all()


def test_mean_curves_reject_unknown_variable(records: dict[tuple[str, int, int], Path]) -> None:
    with pytest.raises(ValueError, match="unknown curve"):
        mean_curves(list(records.values()), "params")


def test_analyze_runs_writes_sweep_files(
    records: dict[tuple[str, int, int], Path], table: xr.Dataset, tmp_path: Path
) -> None:
    summary = analyze_runs(list(records.values()), tmp_path, control="width")
    for name in ("sweep.nc", "accuracy_width.png", "lambda_max_width.png"):
        assert (tmp_path / name).is_file(), name
        assert name in summary["files"], name
    with xr.open_dataset(tmp_path / "sweep.nc") as written:
        np.testing.assert_array_equal(
            written["final_val_accuracy"].values, table["final_val_accuracy"].values
        )
        assert "final_val_accuracy_std" in written
    assert len(summary["sweep"]["points"]) == len(LOSSES) * len(WIDTHS)
    assert json.loads((tmp_path / "summary.json").read_text())["sweep"] == summary["sweep"]


def test_format_summary_lists_grid_points(
    records: dict[tuple[str, int, int], Path], tmp_path: Path
) -> None:
    text = format_summary(analyze_runs(list(records.values()), tmp_path, control="width"))
    lines = text.splitlines()
    start = lines.index("sweep over loss, width, 2 seeds:")
    rows = lines[start + 2 :]
    assert len(rows) == len(LOSSES) * len(WIDTHS)
    assert rows[0].split()[:2] == ["ce", "4"]


def test_analyze_runs_phase_diagram(
    records: dict[tuple[str, int, int], Path], tmp_path: Path
) -> None:
    amplitudes = {4: 1.0, 8: 5.0}
    periods = {"ce": 5, "dce": 10}
    datasets = [
        _relabel(path, amplitude=amplitudes[width], period=periods[loss], loss="dce", width=4)
        for (loss, width, _), path in records.items()
    ]
    summary = analyze_runs(datasets, tmp_path, control="amplitude")
    assert (tmp_path / "phase_diagram.png").is_file()
    assert summary["sweep"]["options"] == ["amplitude", "period"]


def test_analyze_runs_mean_curves(
    records: dict[tuple[str, int, int], Path], tmp_path: Path
) -> None:
    rates = {"ce": 0.1, "dce": 1.0}
    datasets = [_relabel(path, lr=rates[loss], loss="ce") for (loss, _, _), path in records.items()]
    summary = analyze_runs(datasets, tmp_path, control="lr")
    assert (tmp_path / "mean_curves.png").is_file()
    with xr.open_dataset(tmp_path / "curves.nc") as curves:
        assert curves["loss_mean"].dims == ("lr", "width", "step")
        assert curves["lambda_max_mean"].dims == ("lr", "width", "probe_step")
        assert curves["static_loss_mean"].dims == ("lr", "width", "step")
    assert "curves.nc" in summary["files"]


def test_format_summary_without_probes(
    records: dict[tuple[str, int, int], Path], tmp_path: Path
) -> None:
    datasets = [
        _relabel(path).drop_vars(["eigenvalues", "probe_step", "hessian_trace"])
        for path in records.values()
    ]
    text = format_summary(analyze_runs(datasets, tmp_path, control="width"))
    assert "val accuracy (mean +- std, n)" in text
    assert "lambda_max (mean" not in text
    assert not (tmp_path / "lambda_max_width.png").exists()


def test_records_of_mixed_studies_rejected(records: dict[tuple[str, int, int], Path]) -> None:
    # Two studies, one over loss and width, one over lr and amplitude: no common grid.
    datasets = [_relabel(path) for path in records.values()]
    datasets += [
        _relabel(records[("ce", 4, seed)], lr=lr, amplitude=amplitude)
        for seed in SEEDS
        for lr in (0.1, 0.2, 0.3)
        for amplitude in (1.0, 2.0)
    ]
    with pytest.raises(ValueError, match="do not form one grid") as raised:
        sweep_table(datasets)
    assert "amplitude, loss, lr, width" in str(raised.value)


def test_analyze_runs_without_lr_or_amplitude_sweep(
    records: dict[tuple[str, int, int], Path], tmp_path: Path
) -> None:
    summary = analyze_runs(list(records.values()), tmp_path)
    text = format_summary(summary)
    assert summary["control"] is None
    assert "runs.nc" not in summary["files"]
    assert not (tmp_path / "bifurcation_runs.png").exists()
    assert (tmp_path / "accuracy_width.png").is_file()
    assert text.splitlines()[0] == f"{len(records)} runs:"
    assert "  loss-ce_width-4_seed-0.nc: loss " in text


def test_analyze_runs_defaults_to_swept_lr(
    records: dict[tuple[str, int, int], Path], tmp_path: Path
) -> None:
    rates = {"ce": 0.1, "dce": 1.0}
    datasets = [_relabel(path, lr=rates[loss], loss="ce") for (loss, _, _), path in records.items()]
    summary = analyze_runs(datasets, tmp_path)
    assert summary["control"] == "lr"
    assert (tmp_path / "bifurcation_runs.png").is_file()
