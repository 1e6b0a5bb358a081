"""Command-line interface: a thin layer over the Python API that computes nothing itself.

Every user error ends as one `Error: ...` line on stderr with exit code 2; a failed write exits
with 1, a diverged run with 3, an interrupted one with 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import click

from dynscope import __version__
from dynscope.config import (
    ACTIVATIONS,
    CLASS_ORDERS,
    DTYPES,
    INITS,
    LOSSES,
    OPTIMIZERS,
    PARAM_DTYPES,
    SCHEDULES,
    SPECTRA,
    RecordConfig,
    load_toml,
)

# Help text of each record option; the option names are the RecordConfig field names.
OPTION_HELP = {
    "steps": "Number of training steps.",
    "seed": "Seed of the data, the initialisation and the mini-batches.",
    "dataset": "Dataset: spiral, moons, circles, digits, iris, wine, breast_cancer or a file.",
    "classes": "Number of spiral arms (classes) for the generated spiral.",
    "points_per_class": "Training points per class of a generated dataset.",
    "revolutions": "Spiral revolutions (in half turns of pi, as in the spiral formula).",
    "noise": "Noise of a generated dataset (angular noise for the spiral).",
    "val_fraction": "Share of a real or user dataset held out for validation.",
    "width": "Hidden units per layer.",
    "depth": "Number of hidden layers (0 gives a linear model).",
    "activation": "Hidden activation: " + ", ".join(ACTIVATIONS) + ".",
    "init": "Initialisation: " + ", ".join(INITS) + ".",
    "dtype": "Floating-point type of the model: " + ", ".join(DTYPES) + ".",
    "loss": "Loss: " + ", ".join(LOSSES) + ".",
    "amplitude": "Amplitude A >= 1 of the class-weight oscillation (1 is static).",
    "period": "Period T of the oscillation, in steps.",
    "schedule": "Shape of the focus weight over a period: " + ", ".join(SCHEDULES) + ".",
    "static_tail": "Train the last N steps with the static loss (Gamma = 1).",
    "class_order": "Order of the focus classes: " + ", ".join(CLASS_ORDERS) + ".",
    "optimizer": "Optimiser: " + ", ".join(OPTIMIZERS) + " (gd is full-batch).",
    "lr": "Learning rate.",
    "batch_size": "Mini-batch size for sgd (0 is full batch).",
    "momentum": "Heavy-ball momentum in [0, 1).",
    "hessian_every": "Probe the Hessian every N steps (0 turns probes off).",
    "spectrum": "Hessian spectrum per probe: " + ", ".join(SPECTRA) + ".",
    "topk": "Number of top eigenvalues for --spectrum topk.",
    "eigenvectors": "Number of top Hessian eigenvectors stored per probe.",
    "ntk": "Number of top eigenvalues of the empirical neural tangent kernel per probe.",
    "snapshot_every": "Store the parameters every N steps (0 turns snapshots off).",
    "flush_every": "Make rows durable every N steps.",
    "compression": "zlib compression level of the record, 0 to 9.",
    "param_projection": "Store parameter snapshots projected to K random dimensions (0 = off).",
    "param_dtype": "Type of stored parameter snapshots: " + ", ".join(PARAM_DTYPES) + ".",
    "device": "Torch device: cpu, cuda or cuda:N.",
}

EXIT_USAGE = 2
EXIT_WRITE_FAILED = 1
EXIT_SIGINT = 130


@contextlib.contextmanager
def _removed_if_left_empty(folder: Path) -> Iterator[None]:
    """Remove ``folder`` when the block fails, if the block created it and left it empty."""
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _run_safely(action: Callable[[], int | None]) -> None:
    """Run a command body and turn user errors into one line and an exit code."""
    try:
        code = action()
    except (ValueError, click.BadParameter) as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(EXIT_USAGE)
    except OSError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(EXIT_WRITE_FAILED)
    sys.exit(code or 0)


def _record_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add one option per RecordConfig field, all defaulting to None (unset)."""
    for field in reversed([f for f in fields(RecordConfig) if f.name != "extra"]):
        name = "--" + field.name.replace("_", "-")
        kind: Any = {int: int, float: float, str: str}.get(type(field.default), str)
        function = click.option(
            name, field.name, type=kind, default=None, help=OPTION_HELP[field.name]
        )(function)
    return function


class _OneLineErrors(click.Group):
    """A command group whose usage errors print one line instead of Click's three."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run the command line, printing each usage error as ``CMD: message. See CMD --help.``"""
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.UsageError as error:
            if error.ctx is not None and type(error).__name__ == "NoArgsIsHelpError":
                click.echo(error.ctx.get_help())  # a bare group prints its help
                sys.exit(error.exit_code)
            command = self._failed_command(error, args[0] if args else kwargs.get("args"))
            message = " ".join(error.format_message().split())
            ending = "" if message.endswith((".", "?")) else "."
            click.echo(f"{command}: {message}{ending} See {command} --help.", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        # Without standalone mode, Click returns the code of ctx.exit (for example after --help).
        if isinstance(result, int):
            sys.exit(result)
        return result

    def _failed_command(self, error: click.UsageError, args: Sequence[str] | None) -> str:
        """Return the command path to name in a usage error.

        Click raises some parsing errors of a subcommand's options (a missing option value)
        with the group's context, so the subcommand is then taken from the command line.
        """
        context = error.ctx
        root = context.find_root().info_name if context is not None else None
        root = root or "dynscope"
        if context is not None and context.command is not self:
            return context.command_path
        words = list(sys.argv[1:] if args is None else args)
        for word in words:
            if word in self.commands:
                return f"{root} {word}"
        return root


@click.group(cls=_OneLineErrors)
@click.version_option(__version__, prog_name="dynscope")
@click.option("-v", "--verbose", is_flag=True, help="Log progress messages to stderr.")
def main(verbose: bool) -> None:
    """Train networks under dynamical losses and analyse training as a dynamical system."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.option("--config", "config_path", type=click.Path(), help="TOML file of option values.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Record file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing record.")
@click.option("--resume", is_flag=True, help="Continue an interrupted record from its last flush.")
@click.option("--quiet", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--ensemble",
    "ensemble_size",
    type=int,
    default=0,
    help="Train N seeds (seed, seed+1, ...) together in one process; --output is then a folder "
    "of one record per seed. 0 (the default) records one run.",
)
@_record_options
def record(
    config_path: str | None,
    output: str,
    force: bool,
    resume: bool,
    quiet: bool,
    ensemble_size: int,
    **options: Any,
) -> None:
    """Train one network and record every step into a netCDF file."""

    def action() -> int:
        from dynscope.recorder import record as run_record

        flag_values = {k: v for k, v in options.items() if v is not None}
        if resume and (flag_values or config_path):
            names = ", ".join("--" + k.replace("_", "-") for k in flag_values) or "--config"
            raise ValueError(f"--resume continues a record with its stored options; drop {names}")
        values: dict[str, Any] = load_toml(config_path) if config_path else {}
        values.update(flag_values)
        config = RecordConfig.from_dict(values).validate()
        user_options = {key.replace("-", "_") for key in values}
        for option in config.ignored_options():
            # Only options the user set: the default amplitude is no reason to warn.
            if option.split()[0].removeprefix("--").replace("-", "_") in user_options:
                click.echo(f"Warning: {option} has no effect", err=True)
        if resume and force:
            raise ValueError("--resume and --force contradict each other; pass only one")
        if ensemble_size < 0:
            raise ValueError(f"invalid ensemble {ensemble_size}: use a number of seeds >= 1")
        if not output.strip():
            raise ValueError("invalid output '': give the path of the record file to write")
        if ensemble_size:
            return _record_ensemble(config, output, ensemble_size, force, resume, quiet)

        result = run_record(config, output, force=force, resume=resume, quiet=quiet)
        if result.status == "diverged":
            click.echo(
                f"Error: training diverged at step {result.last_step + 1} "
                f"(loss = {result.diverged_value}); steps before it are kept in {result.path}. "
                + ("Lower --lr or the amplitude." if config.is_dynamical else "Lower --lr."),
                err=True,
            )
        elif result.status == "interrupted":
            click.echo(
                f"Interrupted by {result.signal_name} after step {result.last_step}; "
                f"continue with: dynscope record --resume -o {result.path}",
                err=True,
            )
        else:
            click.echo(
                f"Recorded {result.last_step + 1} steps to {result.path} in "
                f"{result.wall_time:.1f} s ({result.steps_per_second:.0f} steps/s)",
                err=True,
            )
        return result.exit_code

    _run_safely(action)


def _record_ensemble(
    config: RecordConfig, output: str, size: int, force: bool, resume: bool, quiet: bool
) -> int:
    from dynscope.ensemble import record_ensemble

    if resume:
        raise ValueError(
            "--ensemble cannot resume; resume each member record alone with "
            "dynscope record --resume -o FOLDER/seed-N.nc"
        )
    folder = Path(output)
    if not folder.parent.exists():
        raise ValueError(f"output folder not found: {folder.parent}; create it first")
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"output {folder} is a file; --ensemble writes one record per seed, so give a folder"
        )
    seeds = range(config.seed, config.seed + size)
    with _removed_if_left_empty(folder):
        folder.mkdir(exist_ok=True)
        results = record_ensemble(config, seeds, folder, force=force, quiet=quiet)
    for result in results:
        click.echo(f"{result.path}: {result.status}, {result.last_step + 1} steps", err=True)
    statuses = {result.status for result in results}
    if "interrupted" in statuses:
        click.echo(
            f"Interrupted; continue each member alone with: dynscope record --resume -o "
            f"{folder}/seed-N.nc",
            err=True,
        )
    if "diverged" in statuses:
        fix = "lower --lr or the amplitude" if config.is_dynamical else "lower --lr"
        click.echo(f"Some members diverged; {fix}.", err=True)
    return max(result.exit_code for result in results)


@main.command()
@click.argument("study_path", metavar="STUDY", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder of the records.")
@click.option(
    "--workers", default=2, show_default=True, help="Worker processes of the local cluster."
)
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler.")
@click.option(
    "--ensemble/--no-ensemble",
    default=True,
    show_default=True,
    help="Train runs that differ only by seed together, in as many groups as workers need.",
)
@click.option("--quiet", is_flag=True, help="Hide the progress bar.")
def sweep(
    study_path: str,
    output: str,
    workers: int,
    scheduler: str | None,
    ensemble: bool,
    quiet: bool,
) -> None:
    """Record every grid point of a study file (TOML with [record] and [sweep]) into OUTPUT."""

    def action() -> int:
        from dynscope.sweep import load_study, run_sweep

        if not logging.getLogger().isEnabledFor(logging.INFO):
            # Dask logs its start-up and shutdown at INFO, and the cleanup after Ctrl-C at
            # WARNING; -v shows them. Importing distributed sets its loggers from Dask's config,
            # so the level is raised after the import.
            import distributed  # noqa: F401

            logging.getLogger("distributed").setLevel(logging.ERROR)
        study = load_study(study_path)
        try:
            result = run_sweep(
                study, output, workers=workers, scheduler=scheduler, ensemble=ensemble, quiet=quiet
            )
        except KeyboardInterrupt:
            click.echo(
                "Interrupted: unfinished records stay resumable; run the same command again to "
                "resume the sweep",
                err=True,
            )
            return EXIT_SIGINT
        for run in result.failed:
            click.echo(f"Error: run {run.name} {run.params} failed: {run.error}", err=True)
        counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts().items()))
        click.echo(
            f"Sweep of {len(result.runs)} runs in {result.wall_time:.1f} s: {counts}", err=True
        )
        return 1 if result.failed else 0

    _run_safely(action)


@main.command()
@click.argument("records", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for the results.")
@click.option(
    "--control",
    default=None,
    help="Swept parameter for a bifurcation diagram across runs (lr, amplitude, width ...); "
    "default: lr or amplitude, whichever the records differ in.",
)
@click.option("--quiet", is_flag=True, help="Do not print the summary.")
def analyze(records: tuple[str, ...], output: str, control: str | None, quiet: bool) -> None:
    """Analyse one record (or several, across a swept parameter) into OUTPUT."""

    def action() -> int:
        from dynscope.analysis import report

        out_dir = Path(output)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"output {out_dir} is a file; give a folder for the analysis")
        paths = _expand_records(records)
        with _removed_if_left_empty(out_dir):
            summary = analyze_into(out_dir, paths)
        if not quiet:
            click.echo(report.format_summary(summary))
        return 0

    def analyze_into(out_dir: Path, paths: list[Path]) -> dict[str, Any]:
        from dynscope import store
        from dynscope.analysis import report

        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ValueError(
                f"cannot create the output folder {out_dir}: a file is in its path; "
                "give another folder"
            ) from None
        try:
            if len(paths) == 1 and control is None:
                summary = report.analyze_record(paths[0], out_dir)
            else:
                summary = report.analyze_runs(paths, out_dir, control=control)
        except store.RecordError as error:
            if len(paths) == 1:
                raise
            raise ValueError(
                f"{error}; remove it from the folder or list the records to analyse"
            ) from None
        except RuntimeError as error:
            # netCDF4 reports a failed write (a full disk, a size limit) as a RuntimeError.
            if "NetCDF" not in str(error) and "HDF" not in str(error):
                raise
            raise OSError(f"cannot write the analysis to {out_dir}: {error}") from error
        return summary

    _run_safely(action)


# netCDF files that `analyze` writes; a folder analysed into itself contains them beside its
# records.
ANALYSIS_FILES = ("analysis.nc", "runs.nc", "sweep.nc", "curves.nc")


def _expand_records(records: tuple[str, ...]) -> list[Path]:
    """Expand folders into the records they contain, in name order.

    A folder's analysis outputs (`ANALYSIS_FILES` that are not records) are left out.
    """
    from dynscope import store

    paths: list[Path] = []
    for name in records:
        path = Path(name)
        if path.is_dir():
            found = []
            for candidate in sorted(path.glob("*.nc")):
                if candidate.name in ANALYSIS_FILES:
                    try:
                        store.record_info(candidate)
                    except store.RecordError:
                        continue
                found.append(candidate)
            if not found:
                raise ValueError(f"no records (*.nc) found in folder {path}")
            paths.extend(found)
        elif not path.exists():
            raise ValueError(f"record not found: {path}; check the path")
        else:
            paths.append(path)
    return paths


@main.command()
@click.argument("record_path", metavar="RECORD", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
def info(record_path: str, as_json: bool) -> None:
    """Print the status, config, steps recorded and variable sizes of a record."""

    def action() -> int:
        from dynscope import store

        details = asdict(store.record_info(record_path))
        if as_json:
            click.echo(json.dumps(details, indent=2, default=str))
        else:
            click.echo(_format_info(details))
        return 0

    _run_safely(action)


def _format_info(details: dict[str, Any]) -> str:
    """Lay out a record's summary as aligned text lines."""
    lines = [
        f"record     {details['path']}",
        f"status     {details['status']}"
        + ("  (or its process stopped before closing it)" if details["status"] == "running" else "")
        + ("; resumable with --resume" if details["can_resume"] else ""),
        "last step  " + ("none" if details["last_step"] is None else str(details["last_step"])),
        f"rows       {details['num_steps']} steps, {details['num_probes']} probes, "
        f"{details['num_snapshots']} snapshots",
        f"size       {details['file_bytes']} bytes on disk"
        + (f" + {details['journal_bytes']} in the journal" if details["journal_bytes"] else ""),
        "variables (uncompressed bytes):",
    ]
    for name, size in sorted(details["variable_bytes"].items()):
        lines.append(f"  {name:24s} {size}")
    lines.append("config:")
    for name, value in sorted(details["config"].items()):
        lines.append(f"  {name:24s} {value}")
    return "\n".join(lines)


@main.command()
@click.argument("system", type=click.Choice(["logistic-map", "double-well"]))
@click.option("--max-doublings", default=4, show_default=True, help="Doublings to locate.")
def groundtruth(system: str, max_doublings: int) -> None:
    """Locate the period doublings of a system with known bifurcation points; print them as JSON."""

    def action() -> int:
        from dynscope.analysis import ground_truth

        result = ground_truth.run_ground_truth(
            system.replace("-", "_"), max_doublings=max_doublings
        )
        click.echo(json.dumps(result, indent=2))
        return 0

    _run_safely(action)


if __name__ == "__main__":
    main()
