"""Run a grid of record jobs, one netCDF record per grid point, on Dask distributed.

A study file (TOML) has two tables::

    [record]            # fixed options of every run (RecordConfig field names)
    steps = 2000
    dataset = "spiral"

    [sweep]             # one list per swept option; the grid is their product
    loss = ["ce", "dce"]
    width = [8, 32]
    seed = [0, 1, 2]

`load_study` checks every option and every grid configuration before anything runs.
`run_sweep` submits one task per group of grid points that differ only by seed, trained together
by `dynscope.ensemble` (groups are halved while workers would stay idle), or with
``ensemble=False`` one task per grid point. Each run writes ``<out_dir>/<name>.nc``, the name
built from the swept values in the order of the ``[sweep]`` table, for example
``loss-dce_width-8_seed-0.nc``.

Running a sweep again is safe. A record made with other options than its grid point (the study
was edited) stops the sweep before anything runs. Otherwise a task first looks at its record,
skips it when its status is "complete" or "diverged", resumes it from its last flush when it is
"running" or "interrupted" (a killed worker leaves "running"), and starts it again when it has
no resume state. A failing run is logged in one line with its parameters and error, and the
others go on. A worker process that dies mid-run is handled by the scheduler, which reruns its
tasks on another worker up to ``distributed.scheduler.allowed-failures`` times (set to
`ALLOWED_FAILURES` for the local cluster); past that the sweep itself resubmits the task up to
`RESUBMISSIONS` times.

Cluster choice:

- default: a `distributed.LocalCluster` of ``workers`` processes with one thread each, because
  every run is CPU-bound in torch and a thread per process avoids contention;
- ``scheduler="tcp://host:8786"``: an existing scheduler, for example one started with
  ``dask scheduler`` and ``dask worker`` on other machines that share ``out_dir``;
- Slurm or PBS through dask-jobqueue (not a dynscope dependency; install it on the cluster)::

      from dask_jobqueue import SLURMCluster   # or PBSCluster, same arguments
      cluster = SLURMCluster(cores=1, processes=1, memory="4GB", walltime="02:00:00")
      cluster.scale(jobs=16)                   # 16 batch jobs, one worker each
      run_sweep(study, "runs", scheduler=cluster.scheduler_address)

  ``out_dir`` must be on a file system that every node sees. A job that hits its walltime
  dies like a killed worker: its task resumes from the last flush on another worker.

Limits: torch in each worker uses one thread (``torch.set_num_threads(1)``) so that the
processes do not compete for cores; runs are not balanced by cost, so a grid over width finishes
when its widest run does.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dynscope.config import RecordConfig

logger = logging.getLogger(__name__)

# How often the local scheduler reruns a task whose worker died before it gives up on it.
ALLOWED_FAILURES = 3

# How often the sweep resubmits a task that the scheduler gave up on (KilledWorker).
RESUBMISSIONS = 2

STUDY_TABLES = ("record", "sweep")

# Record statuses that a rerun keeps as they are: a diverged run would diverge again.
FINISHED_STATUSES = ("complete", "diverged")


@dataclass(frozen=True)
class Study:
    """A grid of record runs: fixed options and the swept values of each axis.

    Attributes
    ----------
    base
        Options shared by every run.
    axes
        Swept option name (RecordConfig field name) to its values, in the study's order.
    """

    base: RecordConfig
    axes: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def points(self) -> list[GridPoint]:
        """Return the grid points in row-major order (the last axis varies fastest)."""
        names = list(self.axes)
        points = []
        for values in itertools.product(*(self.axes[name] for name in names)):
            params = dict(zip(names, values, strict=True))
            points.append(GridPoint(run_name(params), params, _grid_config(self.base, params)))
        return points

    @property
    def size(self) -> int:
        """Number of runs in the grid."""
        size = 1
        for values in self.axes.values():
            size *= len(values)
        return size


@dataclass(frozen=True)
class GridPoint:
    """One run of a study: its record name, swept values and full config."""

    name: str
    params: dict[str, Any]
    config: RecordConfig


@dataclass(frozen=True)
class RunOutcome:
    """How one grid point ended.

    Attributes
    ----------
    name
        Record name without the ``.nc`` suffix.
    params
        The swept values of this run.
    path
        Path of its record.
    status
        "complete", "diverged" or "interrupted" as the recorder left it, or "failed" when the run
        raised (the record may be missing or partial).
    skipped
        True when the record was already finished before this sweep started the task.
    error
        One line "ErrorType: message" for a failed run, else None.
    """

    name: str
    params: dict[str, Any]
    path: Path
    status: str
    skipped: bool = False
    error: str | None = None


@dataclass(frozen=True)
class SweepResult:
    """Outcomes of every grid point, in grid order, and the sweep's wall time in seconds."""

    runs: tuple[RunOutcome, ...]
    wall_time: float

    @property
    def failed(self) -> tuple[RunOutcome, ...]:
        """The runs that raised."""
        return tuple(run for run in self.runs if run.status == "failed")

    @property
    def paths(self) -> list[Path]:
        """Record paths of the runs that did not fail, in grid order."""
        return [run.path for run in self.runs if run.status != "failed"]

    def counts(self) -> dict[str, int]:
        """Return the number of runs per status, with skipped runs counted apart."""
        counts: dict[str, int] = {}
        for run in self.runs:
            key = "skipped" if run.skipped else run.status
            counts[key] = counts.get(key, 0) + 1
        return counts


def load_study(path: str | Path) -> Study:
    """Read a study file and check every grid configuration before anything runs.

    Parameters
    ----------
    path
        TOML file with a ``[record]`` table of fixed options and a ``[sweep]`` table of lists.

    Returns
    -------
    Study

    Raises
    ------
    ValueError
        For a missing or invalid file, an unknown table or option, a swept value that is not a
        non-empty list, or a grid configuration that `RecordConfig.validate` rejects; the message
        names the key or value.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"study file {path} is a folder; give a TOML file")
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ValueError(f"study file not found: {path}; check the path") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"invalid TOML in study file {path}: {error}") from None
    return study_from_dict(document, source=str(path))


def study_from_dict(document: dict[str, Any], source: str = "study") -> Study:
    """Build and check a study from the tables of a study file (see `load_study`)."""
    unknown = sorted(set(document) - set(STUDY_TABLES))
    if unknown:
        raise ValueError(
            f"unknown table or key {unknown[0]!r} in {source}: a study has only [record] (fixed "
            "options) and [sweep] (lists of values)"
        )
    fixed = _table(document, "record", source)
    swept = _table(document, "sweep", source)

    overlap = sorted(set(fixed) & set(swept))
    if overlap:
        raise ValueError(
            f"option {overlap[0]!r} is in both [record] and [sweep] of {source}: keep it in one"
        )
    try:
        base = RecordConfig.from_dict(fixed)
    except ValueError as error:
        raise ValueError(f"invalid [record] table in {source}: {error}") from None

    axes: dict[str, tuple[Any, ...]] = {}
    for key, values in swept.items():
        name = _option_name(key, source)
        if not isinstance(values, list):
            raise ValueError(
                f"invalid [sweep] value for {key!r} in {source}: {values!r} is not a list; "
                f"write {key} = [{values!r}] or move it to [record]"
            )
        if not values:
            raise ValueError(f"empty list for {key!r} in [sweep] of {source}: give some values")
        converted = tuple(RecordConfig.from_dict({name: value}).to_dict()[name] for value in values)
        if len(set(converted)) != len(converted):
            raise ValueError(f"repeated value in [sweep] {key} = {values!r} of {source}")
        axes[name] = converted

    study = Study(base=base, axes=axes)
    _check_points(study, source)
    return study


def run_name(params: dict[str, Any]) -> str:
    """Return the record name of a grid point, such as ``loss-dce_width-8_seed-0``.

    Keys use the option spelling with dashes; values keep letters, digits, ``.``, ``+`` and
    ``-``, and any other run of characters becomes ``-`` (a dataset path ``data/a b.csv`` gives
    ``data-a-b.csv``). A grid with no swept option has the single name ``run``.
    """
    if not params:
        return "run"
    parts = []
    for key, value in params.items():
        text = repr(value) if isinstance(value, float) else str(value)
        text = re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-.") or "empty"
        parts.append(f"{key.replace('_', '-')}-{text}")
    return "_".join(parts)


def run_sweep(
    study: Study,
    out_dir: str | Path,
    *,
    workers: int = 2,
    scheduler: str | None = None,
    ensemble: bool = True,
    quiet: bool = False,
) -> SweepResult:
    """Record every grid point of a study on Dask distributed and return how each ended.

    Parameters
    ----------
    study
        The grid, from `load_study`.
    out_dir
        Folder of the records; it is created if missing and must be visible to every worker.
    workers
        Worker processes of the local cluster (ignored with ``scheduler``).
    scheduler
        Address of a running Dask scheduler to use instead of a local cluster.
    ensemble
        Train the runs that differ only by seed together (`dynscope.ensemble`). A group is
        split in halves while there are fewer groups than worker threads, so that every worker
        has a run; False runs each grid point alone.
    quiet
        Hide the progress bar (it also hides itself when stderr is not a terminal).

    Returns
    -------
    SweepResult
        One outcome per grid point, in grid order. Failed runs are listed, not raised.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"invalid workers {workers!r}: use an integer >= 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} is a file; give a folder for the records")

    points = study.points()
    _check_existing_records(points, out_dir)
    started = time.perf_counter()
    with _client(workers, scheduler) as client:
        # Created only now, so that a sweep that cannot start leaves no empty folder behind.
        out_dir.mkdir(parents=True, exist_ok=True)
        if ensemble:
            threads = sum(client.nthreads().values())
            groups = _split_groups(_group_points(points), threads)
        else:
            groups = [[point] for point in points]
        outcomes = _run_groups(client, groups, out_dir, quiet)
    ordered = tuple(outcomes[point.name] for point in points)
    return SweepResult(runs=ordered, wall_time=time.perf_counter() - started)


def _table(document: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise ValueError(f"invalid [{name}] in {source}: expected a table of option = value")
    return table


def _option_name(key: str, source: str) -> str:
    name = key.replace("-", "_")
    known = sorted(f.name for f in fields(RecordConfig) if f.name != "extra")
    if name not in known:
        raise ValueError(
            f"unknown option {key!r} in [sweep] of {source}: valid options are "
            + ", ".join(n.replace("_", "-") for n in known)
        )
    return name


def _grid_config(base: RecordConfig, params: dict[str, Any]) -> RecordConfig:
    return base.replace(**params)


def _check_points(study: Study, source: str) -> None:
    seen: dict[str, dict[str, Any]] = {}
    for point in study.points():
        try:
            point.config.validate()
        except ValueError as error:
            raise ValueError(f"invalid grid point {point.name} in {source}: {error}") from None
        if point.name in seen:
            raise ValueError(
                f"grid points {seen[point.name]} and {point.params} of {source} share the record "
                f"name {point.name}: make the swept values differ after removing symbols"
            )
        seen[point.name] = point.params


def _group_points(points: Sequence[GridPoint]) -> list[list[GridPoint]]:
    """Group the points whose configs differ only by seed, keeping grid order within groups."""
    groups: dict[RecordConfig, list[GridPoint]] = {}
    for point in points:
        groups.setdefault(point.config.replace(seed=0), []).append(point)
    return list(groups.values())


# Options that change how a record is stored, not what it contains; a rerun may change them.
STORAGE_OPTIONS = frozenset({"flush_every", "compression"})


def _check_existing_records(points: Sequence[GridPoint], out_dir: Path) -> None:
    """Raise ValueError when a readable record in ``out_dir`` has other options than its point.

    Skipping or resuming such a record would keep results of another study under this study's
    name. Unreadable records are left to their tasks, which record them again.
    """
    from dynscope import store

    mismatched: list[tuple[Path, list[str], dict[str, Any], dict[str, Any]]] = []
    for point in points:
        path = out_dir / f"{point.name}.nc"
        if not path.exists():
            continue
        try:
            stored = store.record_info(path).config
        except store.RecordError:
            continue
        expected = json.loads(point.config.to_json())
        changed = sorted(
            key
            for key in expected.keys() | stored.keys()
            if key not in STORAGE_OPTIONS and expected.get(key) != stored.get(key)
        )
        if changed:
            mismatched.append((path, changed, stored, expected))
    if not mismatched:
        return
    path, changed, stored, expected = mismatched[0]
    differences = ", ".join(
        f"{key} {stored.get(key)!r} in the record, {expected.get(key)!r} in the study"
        for key in changed[:3]
    )
    more_options = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    if len(mismatched) == 1:
        subject, fix = f"record {path} was", "delete the record to record it again"
    else:
        subject = f"record {path} and {len(mismatched) - 1} other records were"
        fix = "delete those records to record them again"
    raise ValueError(
        f"{subject} made with other options ({differences}{more_options}): give another output "
        f"folder, or {fix}"
    )


def _split_groups(groups: list[list[GridPoint]], threads: int) -> list[list[GridPoint]]:
    """Halve the largest group until there are ``threads`` groups or only single runs.

    An ensemble of K members takes longer than one of K / 2, so with idle workers two halves
    finish sooner than the whole. The halves stay in place, which keeps the grid order.
    """
    groups = list(groups)
    while len(groups) < threads:
        largest = max(range(len(groups)), key=lambda index: len(groups[index]))
        group = groups[largest]
        if len(group) < 2:
            break
        half = (len(group) + 1) // 2
        groups[largest : largest + 1] = [group[:half], group[half:]]
    return groups


@dataclass(frozen=True)
class _Task:
    """What one Dask task records: a group of runs that differ only by seed (often one run)."""

    config_json: str
    seeds: tuple[int, ...]
    paths: tuple[str, ...]


def _run_task(task: _Task) -> list[tuple[str, bool]]:
    """Record the runs of a task on a worker; return (status, skipped) per run.

    Finished records are skipped and partial ones resumed, here on the worker rather than when
    the task is planned, because a task rerun after its worker died finds its own partial record.
    """
    import torch

    from dynscope import ensemble, recorder

    torch.set_num_threads(1)
    config = RecordConfig.from_json(task.config_json)
    statuses: dict[int, tuple[str, bool]] = {}
    fresh: list[int] = []
    for index, (seed, name) in enumerate(zip(task.seeds, task.paths, strict=True)):
        path = Path(name)
        status = _record_status(path)
        if status in FINISHED_STATUSES:
            statuses[index] = (status, True)
        elif status is None:
            fresh.append(index)
        else:
            statuses[index] = (_resume(config.replace(seed=seed), path), False)

    if len(fresh) > 1:
        seeds = [task.seeds[i] for i in fresh]
        paths = [Path(task.paths[i]) for i in fresh]
        results = ensemble.record_ensemble(config, seeds, paths, force=True, quiet=True)
        for index, result in zip(fresh, results, strict=True):
            statuses[index] = (result.status, False)
    if len(fresh) == 1:
        index = fresh[0]
        member = config.replace(seed=task.seeds[index])
        result = recorder.record(member, task.paths[index], force=True, quiet=True)
        statuses[index] = (result.status, False)
    return [statuses[index] for index in range(len(task.paths))]


def _record_status(path: Path) -> str | None:
    """Return the status of the record at ``path``, or None when it must be recorded afresh."""
    from dynscope import store

    if not path.exists():
        return None
    try:
        info = store.record_info(path)
    except store.RecordError as error:
        logger.warning("recording %s again because it is not a readable record: %s", path, error)
        return None
    if info.status not in FINISHED_STATUSES and not info.can_resume:
        logger.warning("recording %s again because it has no resume state", path)
        return None
    return info.status


def _resume(config: RecordConfig, path: Path) -> str:
    """Resume a partial record from its last flush and return its final status."""
    from dynscope import recorder

    try:
        return recorder.record(config, path, resume=True, quiet=True).status
    except ValueError:
        # A run killed after its last flush but before closing holds every step: the recorder
        # marks it complete and raises, which is the outcome wanted here.
        if _record_status(path) == "complete":
            return "complete"
        raise


@dataclass
class _ClientHandle:
    client: Any
    cluster: Any = None

    def __enter__(self) -> Any:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _client(workers: int, scheduler: str | None) -> _ClientHandle:
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            return _ClientHandle(Client(scheduler, timeout="20s"))
        except ValueError as error:
            raise ValueError(
                f"invalid scheduler address {scheduler!r}: {error}; give tcp://HOST:PORT"
            ) from None
        except OSError as error:
            raise ValueError(
                f"cannot connect to the Dask scheduler at {scheduler}: {error}; check the address "
                "and that the scheduler is running"
            ) from None

    # The scheduler reads this when it starts, so it must be set before LocalCluster.
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        with _sigint_ignored():
            # Worker processes inherit the ignored SIGINT, so Ctrl-C reaches only this process,
            # which closes the cluster, instead of raising KeyboardInterrupt in every worker.
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                host="127.0.0.1",
                # Workers log task cancellations at WARNING when a sweep is interrupted; they
                # show only where INFO logging is on (dynscope -v).
                silence_logs=logging.INFO if logger.isEnabledFor(logging.INFO) else logging.ERROR,
            )
    return _ClientHandle(Client(cluster), cluster)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT inside the block (in the main thread only, where handlers can change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_groups(
    client: Any, groups: list[list[GridPoint]], out_dir: Path, quiet: bool
) -> dict[str, RunOutcome]:
    from distributed import as_completed
    from tqdm import tqdm

    tasks: dict[str, tuple[_Task, list[GridPoint]]] = {}
    futures = []
    for group in groups:
        task = _Task(
            config_json=group[0].config.to_json(),
            seeds=tuple(point.config.seed for point in group),
            paths=tuple(str(out_dir / f"{point.name}.nc") for point in group),
        )
        key = f"record-{group[0].name}"
        tasks[key] = (task, group)
        futures.append(client.submit(_run_task, task, key=key, pure=False))

    total = sum(len(group) for group in groups)
    show_bar = not quiet and sys.stderr.isatty()
    outcomes: dict[str, RunOutcome] = {}
    resubmitted: dict[str, int] = {}
    with tqdm(total=total, unit="run", disable=not show_bar, file=sys.stderr) as bar:
        pending = as_completed(futures)
        for future in pending:
            task, group = tasks[future.key]
            if future.status == "finished":
                _collect(outcomes, group, task, future.result())
                bar.update(len(group))
                continue

            error = future.exception()
            if _is_killed_worker(error) and resubmitted.get(future.key, 0) < RESUBMISSIONS:
                resubmitted[future.key] = resubmitted.get(future.key, 0) + 1
                logger.warning("resubmitting %s after its workers died: %s", future.key, error)
                pending.add(client.submit(_run_task, task, key=future.key, pure=False))
                continue
            for point, path in zip(group, task.paths, strict=True):
                message = f"{type(error).__name__}: {error}".splitlines()[0]
                logger.error("run %s %s failed: %s", point.name, point.params, message)
                outcomes[point.name] = RunOutcome(
                    point.name, point.params, Path(path), "failed", error=message
                )
            bar.update(len(group))
    return outcomes


def _collect(
    outcomes: dict[str, RunOutcome],
    group: list[GridPoint],
    task: _Task,
    results: list[tuple[str, bool]],
) -> None:
    for point, path, (status, skipped) in zip(group, task.paths, results, strict=True):
        outcomes[point.name] = RunOutcome(point.name, point.params, Path(path), status, skipped)
        if status != "complete":
            logger.warning("run %s %s ended %s", point.name, point.params, status)


def _is_killed_worker(error: BaseException | None) -> bool:
    from distributed.scheduler import KilledWorker

    return isinstance(error, KilledWorker)
