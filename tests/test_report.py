"""The analysis report on synthetic records built in the record schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from dynscope.analysis.report import analyze_record, analyze_runs, format_summary

STEPS = 1200
ONSET = 600  # step at which dF starts to alternate in the synthetic record
LR = 0.5


def _synthetic_record(
    *, probes: bool = True, snapshots: bool = True, lr: float = LR, amplitude: float = 5.0
) -> xr.Dataset:
    """Build a record whose dF drifts, then alternates from ONSET, and whose sharpness rises."""
    steps = np.arange(STEPS)
    df = -1e-3 * np.exp(-steps / 400) + 2e-4 * np.where(steps % 2 == 0, 1, -1) * (steps >= ONSET)
    loss = 2.0 + np.cumsum(df)
    config = {"loss": "dce", "lr": lr, "amplitude": amplitude, "period": 600, "width": 8}
    data: dict = {
        "loss": ("step", loss, {"long_name": "loss", "units": "1"}),
        "static_loss": ("step", loss, {"long_name": "static loss", "units": "1"}),
        "train_accuracy": ("step", np.linspace(0.3, 0.9, STEPS), {"units": "1"}),
        "val_accuracy": ("step", np.linspace(0.3, 0.8, STEPS), {"units": "1"}),
        "grad_norm": ("step", np.ones(STEPS), {"units": "1"}),
        "lr": ("step", np.full(STEPS, lr), {"units": "1"}),
        "gamma": (("step", "label"), np.ones((STEPS, 3)), {"units": "1"}),
    }
    if probes:
        probe_steps = np.arange(0, STEPS, 25)
        top = np.linspace(1.0, 5.0, probe_steps.size)
        eigenvalues = np.stack([top, top / 2, top / 4, np.full_like(top, 0.1)], axis=1)
        data["probe_step"] = ("probe", probe_steps, {"units": "step"})
        data["eigenvalues"] = (("probe", "eig"), eigenvalues, {"units": "1"})
        data["hessian_trace"] = ("probe", eigenvalues.sum(axis=1), {"units": "1"})
    if snapshots:
        snapshot_steps = np.arange(0, STEPS, 100)
        params = np.outer(np.arange(snapshot_steps.size), np.ones(10))
        data["snapshot_step"] = ("snapshot", snapshot_steps, {"units": "step"})
        data["params"] = (("snapshot", "param"), params, {"units": "1"})
    return xr.Dataset(
        data,
        coords={"step": steps, "label": np.arange(3)},
        attrs={"config": json.dumps(config), "status": "complete", **config},
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Analyse the synthetic record once and return the summary and the output folder."""
    out_dir = tmp_path_factory.mktemp("report")
    return analyze_record(_synthetic_record(), out_dir), out_dir


def test_report_writes_files(report: tuple[dict, Path]) -> None:
    _, tmp_path = report
    for name in ["summary.json", "analysis.nc", "overview.png", "bifurcation.png", "spectrum.png"]:
        assert (tmp_path / name).is_file(), name


def test_report_summary_keys(report: tuple[dict, Path]) -> None:
    summary, _ = report
    for key in ["period_doubling", "max_period", "curvature", "exploration", "accuracy"]:
        assert key in summary, key
    for key in ["edge", "lambda_max_final", "fraction_above_edge", "first_crossing_step"]:
        assert key in summary["curvature"], key
    assert "lag" in summary["edge_of_stability"]


def test_report_finds_period_doubling(report: tuple[dict, Path]) -> None:
    summary, _ = report
    events = summary["period_doubling"]
    assert [(e["from_period"], e["to_period"]) for e in events] == [(1, 2)]
    assert abs(events[0]["step"] - ONSET) <= 4
    assert summary["max_period"] == 2


def test_report_curvature_values(report: tuple[dict, Path]) -> None:
    summary, _ = report
    curvature = summary["curvature"]
    assert curvature["edge"] == pytest.approx(2 / LR)
    assert curvature["lambda_max_final"] == pytest.approx(5.0)
    # lambda_max rises linearly from 1 to 5 over 48 probes: probes 36..47 exceed 4.
    assert curvature["fraction_above_edge"] == pytest.approx(12 / 48)
    assert curvature["first_crossing_step"] == 900


def test_report_exploration_values(report: tuple[dict, Path]) -> None:
    summary, _ = report
    # Twelve snapshots along a straight line, each sqrt(10) from the previous.
    assert summary["exploration"]["path_length"] == pytest.approx(11 * np.sqrt(10))
    assert summary["exploration"]["displacement"] == pytest.approx(11 * np.sqrt(10))


def test_report_summary_json_matches(report: tuple[dict, Path]) -> None:
    summary, tmp_path = report
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_report_analysis_file_units(report: tuple[dict, Path]) -> None:
    _, tmp_path = report
    with xr.open_dataset(tmp_path / "analysis.nc") as analysis:
        for name in [
            "period",
            "bifurcation_value",
            "lambda_max",
            "displacement",
            "path_length_per_cycle",
        ]:
            assert "long_name" in analysis[name].attrs, name
            assert "units" in analysis[name].attrs, name


def test_report_without_probes_or_snapshots(tmp_path: Path) -> None:
    summary = analyze_record(_synthetic_record(probes=False, snapshots=False), tmp_path)
    assert summary["curvature"] is None
    assert summary["exploration"] is None
    assert summary["edge_of_stability"] is None
    assert not (tmp_path / "spectrum.png").exists()


def test_report_rejects_unknown_observable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="observable"):
        analyze_record(_synthetic_record(), tmp_path, observable="missing")


def test_format_summary_mentions_doubling(report: tuple[dict, Path]) -> None:
    text = format_summary(report[0])
    assert "1->2" in text


def test_runs_against_lr(tmp_path: Path) -> None:
    records = [_synthetic_record(lr=lr) for lr in (0.5, 0.25)]
    summary = analyze_runs(records, tmp_path, control="lr")
    assert [run["control_value"] for run in summary["runs"]] == [0.5, 0.25]
    assert [run["final_period"] for run in summary["runs"]] == [2, 2]
    assert (tmp_path / "bifurcation_runs.png").is_file()


def test_runs_curvature_reduction(tmp_path: Path) -> None:
    static = _synthetic_record(amplitude=1.0)
    static.attrs["loss"] = "ce"
    summary = analyze_runs([_synthetic_record(), static], tmp_path, control="amplitude")
    assert len(summary["curvature_reduction"]) == 1
    assert summary["curvature_reduction"][0]["ratio"] == pytest.approx(1.0)


def test_runs_reject_missing_control(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no option"):
        analyze_runs([_synthetic_record()], tmp_path, control="momentum")
