"""Tests of the command-line interface: each command, bad input, signals and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from dynscope import __version__, open_record
from dynscope.cli import main

SMALL_FLAGS = [
    "--steps", "40", "--points-per-class", "20", "--width", "12", "--period", "20",
    "--amplitude", "5", "--lr", "0.5", "--hessian-every", "10", "--snapshot-every", "10",
    "--flush-every", "10", "--quiet",
]  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynscope.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_version_prints_package_version() -> None:
    result = CliRunner().invoke(main, ["--version"])

    assert result.exit_code == 0
    assert __version__ in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["record", "--no-such-flag"], "dynscope record: No such option '--no-such-flag'"),
        (["record", "--lr", "abc"], "dynscope record: Invalid value for '--lr'"),
        (["info"], "dynscope info: Missing argument 'RECORD'"),
        (["nosuch"], "dynscope: No such command 'nosuch'"),
        (["record", "-o"], "dynscope record: Option '-o' requires an argument"),
        (["groundtruth"], "dynscope groundtruth: Missing argument"),
    ],
)
def test_usage_error_prints_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args, prog_name="dynscope")

    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(message)
    assert result.output.rstrip().endswith("--help.")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "-1"], "invalid lr -1.0"),
        (["--amplitude", "0.5"], "invalid amplitude 0.5"),
        (["--period", "0"], "invalid period 0"),
        (["--loss", "hinge"], "invalid loss 'hinge'"),
    ],
)
def test_record_rejects_bad_option(tmp_path: Path, flags: list[str], message: str) -> None:
    output = tmp_path / "run.nc"
    result = CliRunner().invoke(main, ["record", *flags, "-o", str(output)])

    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"Error: {message}")
    assert not output.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--spectrum", "topk", "--topk", "100000"], "invalid topk 100000"),
        (["--ntk", "100000"], "invalid ntk 100000"),
        (["--param-projection", "100000"], "invalid param-projection 100000"),
    ],
)
def test_record_rejects_size_before_writing(tmp_path: Path, flags: list[str], message: str) -> None:
    output = tmp_path / "run.nc"
    result = CliRunner().invoke(main, ["record", *SMALL_FLAGS, *flags, "-o", str(output)])

    assert result.exit_code == 2
    assert result.output.startswith(f"Error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_resume_rejects_other_options(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["record", "--resume", "--lr", "0.5", "-o", str(tmp_path / "run.nc")]
    )

    assert result.exit_code == 2
    assert "drop --lr" in result.output


def test_record_rejects_missing_folder(tmp_path: Path) -> None:
    output = tmp_path / "absent" / "run.nc"
    result = CliRunner().invoke(main, ["record", *SMALL_FLAGS, "-o", str(output)])

    assert result.exit_code == 2
    assert "output folder not found" in result.output
    assert not output.parent.exists()


def test_record_rejects_existing_file(tmp_path: Path) -> None:
    output = tmp_path / "run.nc"
    output.write_text("old")
    result = CliRunner().invoke(main, ["record", *SMALL_FLAGS, "-o", str(output)])

    assert result.exit_code == 2
    assert "--force" in result.output
    assert output.read_text() == "old"


def test_record_config_file_and_override(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('loss = "ce"\nsteps = 25\nwidth = 12\npoints_per_class = 20\n')
    output = tmp_path / "run.nc"
    result = CliRunner().invoke(
        main,
        ["record", "--config", str(config), "--steps", "15", "--hessian-every", "0", "--quiet",
         "-o", str(output)],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    record = open_record(output)
    assert record.sizes["step"] == 15
    assert json.loads(record.attrs["config"])["loss"] == "ce"


def test_info_and_analyze_commands(tmp_path: Path) -> None:
    output = tmp_path / "run.nc"
    runner = CliRunner()
    recorded = runner.invoke(main, ["record", *SMALL_FLAGS, "-o", str(output)])
    info = runner.invoke(main, ["info", str(output)])
    analyzed = runner.invoke(main, ["analyze", str(output), "-o", str(tmp_path / "out")])

    assert recorded.exit_code == 0, recorded.output
    assert info.exit_code == 0, info.output
    assert "complete" in info.output
    assert analyzed.exit_code == 0, analyzed.output
    for name in ("summary.json", "analysis.nc", "overview.png", "bifurcation.png", "spectrum.png"):
        assert (tmp_path / "out" / name).exists(), name


def _bad_record(kind: str, folder: Path, small_record: Path) -> Path:
    path = folder / f"{kind}.nc"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        path.write_bytes(small_record.read_bytes()[:3000])
    else:
        import xarray as xr

        xr.Dataset({"temperature": ("time", np.arange(5.0))}).to_netcdf(path)
    return path


@pytest.mark.parametrize("command", ["info", "analyze"])
@pytest.mark.parametrize("kind", ["random", "truncated", "not_a_record"])
def test_bad_file_gives_one_line(
    tmp_path: Path, small_record: Path, kind: str, command: str
) -> None:
    path = _bad_record(kind, tmp_path, small_record)
    extra = ["-o", str(tmp_path / "out")] if command == "analyze" else []
    started = time.monotonic()
    result = _run(command, str(path), *extra)

    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("Error: ")
    assert time.monotonic() - started < 10


def test_analyze_folder_into_itself_twice(tmp_path: Path, small_record: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "seed-0.nc").write_bytes(small_record.read_bytes())
    runner = CliRunner()
    recorded = runner.invoke(
        main, ["record", *SMALL_FLAGS, "--seed", "1", "-o", str(folder / "seed-1.nc")]
    )
    assert recorded.exit_code == 0, recorded.output

    first = runner.invoke(main, ["analyze", str(folder), "-o", str(folder), "--control", "seed"])
    second = runner.invoke(main, ["analyze", str(folder), "-o", str(folder), "--control", "seed"])

    assert first.exit_code == 0, first.output
    assert (folder / "runs.nc").is_file()
    assert second.exit_code == 0, second.output
    assert "2 runs against seed" in second.output


def test_static_loss_warns_for_set_amplitude(tmp_path: Path) -> None:
    flags = ["--steps", "5", "--points-per-class", "10", "--hessian-every", "0", "--quiet"]
    runner = CliRunner()

    default = runner.invoke(main, ["record", *flags, "--loss", "mse", "-o", str(tmp_path / "a")])
    explicit = runner.invoke(
        main, ["record", *flags, "--loss", "mse", "--amplitude", "5", "-o", str(tmp_path / "b")]
    )

    assert default.exit_code == 0, default.output
    assert "has no effect" not in default.output
    assert "Warning: --amplitude 5.0 (loss mse is static) has no effect" in explicit.output


def test_bad_file_in_folder_names_fix(tmp_path: Path, small_record: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "good.nc").write_bytes(small_record.read_bytes())
    _bad_record("truncated", folder, small_record)

    result = CliRunner().invoke(main, ["analyze", str(folder), "-o", str(tmp_path / "out")])

    assert result.exit_code == 2, result.output
    assert "truncated.nc is truncated" in result.output
    assert "remove it from the folder or list the records to analyse" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spectrum", ["full", "topk"])
def test_sigterm_then_resume_matches_full_run(tmp_path: Path, spectrum: str) -> None:
    flags = ["--steps", "1500", "--points-per-class", "20", "--width", "12", "--period", "200",
             "--amplitude", "5", "--lr", "0.5", "--hessian-every", "100",
             "--spectrum", spectrum, "--topk", "3",
             "--snapshot-every", "100", "--flush-every", "50", "--quiet"]  # fmt: skip
    interrupted = tmp_path / "interrupted.nc"
    process = subprocess.Popen(
        [sys.executable, "-m", "dynscope.cli", "record", *flags, "-o", str(interrupted)],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not Path(str(interrupted) + ".journal").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 143, stderr
    assert open_record(interrupted).attrs["status"] == "interrupted"

    resumed = _run("record", "--resume", "-o", str(interrupted), "--quiet")
    full = tmp_path / "full.nc"
    uninterrupted = _run("record", *flags, "-o", str(full))

    assert resumed.returncode == 0, resumed.stderr
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    first = open_record(interrupted)
    second = open_record(full)
    assert first.attrs["status"] == "complete"
    for name in ("loss", "grad_norm", "eigenvalues", "params", "gamma"):
        np.testing.assert_array_equal(first[name].values, second[name].values)


def test_divergence_exits_with_three(tmp_path: Path) -> None:
    output = tmp_path / "run.nc"
    result = _run("record", "--loss", "mse", "--lr", "100", "--steps", "300", "--width", "12",
                  "--points-per-class", "20", "--hessian-every", "0", "--quiet",
                  "-o", str(output))  # fmt: skip

    assert result.returncode == 3
    assert "diverged at step" in result.stderr
    assert open_record(output).attrs["status"] == "diverged"


def test_write_failure_exits_with_one(tmp_path: Path) -> None:
    output = tmp_path / "run.nc"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))\n"
        "from dynscope.cli import main\n"
        "sys.argv = ['dynscope'] + sys.argv[1:]\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "record", "--steps", "5000", "--width", "12",
         "--points-per-class", "20", "--hessian-every", "10", "--flush-every", "50",
         "--quiet", "-o", str(output)],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )  # fmt: skip

    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("Error: ")
    assert open_record(output).sizes["step"] > 0


def test_analyze_write_failure_leaves_no_partial(tmp_path: Path, small_record: Path) -> None:
    out_dir = tmp_path / "analysis"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "from dynscope.cli import main\n"
        "sys.argv = ['dynscope'] + sys.argv[1:]\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "analyze", str(small_record), "-o", str(out_dir)],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )  # fmt: skip

    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: cannot write the analysis")
    assert not list(out_dir.glob(".*.partial"))
    for netcdf in out_dir.glob("*.nc"):
        open_record(netcdf) if netcdf.name == "run.nc" else xr.open_dataset(netcdf).close()
