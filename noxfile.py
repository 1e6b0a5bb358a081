"""Sessions: tests (default), slow, lint, demo and bench.

Every session installs the pinned CPU build of torch first: an unpinned install lets pip choose a
CUDA build of several GB.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
TORCH = "torch==2.13.0"


def install(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    target = ".[" + ",".join(extras) + "]" if extras else "."
    session.install("-e", target)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the fast test suite (slow-marked tests excluded)."""
    install(session, "test")
    session.run("pytest", "-q", *session.posargs)


@nox.session(python=PYTHON)
def slow(session: nox.Session) -> None:
    """Run only the slow-marked tests (crash kills, long records, clusters)."""
    install(session, "test")
    session.run("pytest", "-q", "-m", "slow", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check style, formatting and types."""
    install(session, "test", "lint")
    session.run("ruff", "check", "dynscope", "tests", "benchmarks")
    session.run("ruff", "format", "--check", "dynscope", "tests", "benchmarks")
    session.run("mypy", "dynscope")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Record and analyse a short dynamical cross-entropy run on the spiral task."""
    install(session)
    Path("demo").mkdir(exist_ok=True)
    session.run(
        "dynscope",
        "record",
        "--config",
        "analyses/demo/config.toml",
        "-o",
        "demo/run.nc",
        "--force",
    )
    session.run("dynscope", "analyze", "demo/run.nc", "-o", "demo/analysis")
    session.log("Figures: demo/analysis/overview.png, bifurcation.png, spectrum.png")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks, which print medians and ratios against named baselines."""
    install(session, "test")
    # The comparison libraries; torch is already pinned, so none of them pulls another build.
    session.install("jax[cpu]", "pyhessian", "hessian-eigenthings")
    scripts = ("hessian.py", "store.py", "training.py", "sweep.py")
    for script in scripts:
        session.run("python", f"benchmarks/{script}", *session.posargs)
