"""Measure how far training explores parameter space, from parameter snapshots.

Path length is sum ||theta_{s+1} - theta_s|| over consecutive snapshots and displacement is
||theta_t - theta_0||, both in total and per oscillation cycle. When top Hessian eigenvectors are
recorded, each snapshot-to-snapshot step is split into its share along their span and the share
orthogonal to it. The effective dimension of the trajectory is the participation ratio of the
eigenvalues of the snapshot covariance.

Limits: snapshots are taken every `snapshot_every` steps, so the path length is that of the
snapshot polygon, a lower bound of the path of the individual steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Exploration:
    """Path length and displacement of a trajectory of parameter snapshots.

    Attributes
    ----------
    path_length : float
        Sum of the distances between consecutive snapshots.
    displacement : float
        Distance from the first snapshot to the last.
    displacement_curve : numpy.ndarray, shape (S,)
        ||theta_s - theta_0|| for every snapshot.
    cycles : numpy.ndarray of int, shape (K,)
        Cycle index of each per-cycle entry (empty without a cycle period).
    path_length_per_cycle, displacement_per_cycle : numpy.ndarray, shape (K,)
        Path length inside each cycle, and distance between the first and last snapshot of
        each cycle.
    effective_dimension : float
        Participation ratio of the snapshot covariance eigenvalues (nan with fewer than two
        snapshots).
    """

    path_length: float
    displacement: float
    displacement_curve: np.ndarray
    cycles: np.ndarray
    path_length_per_cycle: np.ndarray
    displacement_per_cycle: np.ndarray
    effective_dimension: float


@dataclass(frozen=True)
class StepAlignment:
    """Share of each snapshot-to-snapshot step along the top Hessian eigenvectors.

    Attributes
    ----------
    step : numpy.ndarray of int, shape (M,)
        Snapshot step at which each parameter step starts.
    along : numpy.ndarray, shape (M,)
        Fraction of the squared step norm inside the span of the eigenvectors.
    orthogonal : numpy.ndarray, shape (M,)
        1 - along.
    per_eigenvector : numpy.ndarray, shape (M, k)
        Fraction of the squared step norm along each eigenvector.
    """

    step: np.ndarray
    along: np.ndarray
    orthogonal: np.ndarray
    per_eigenvector: np.ndarray


def exploration(
    params: np.ndarray, snapshot_steps: np.ndarray, period: int | None = None
) -> Exploration:
    """Compute path length, displacement and effective dimension of a snapshot trajectory.

    Parameters
    ----------
    params : array_like, shape (S, P)
        Parameter snapshots in order of step.
    snapshot_steps : array_like of int, shape (S,)
        Step of each snapshot.
    period : int, optional
        Oscillation period T in steps; gives the per-cycle values (cycle k covers steps
        [k T, (k + 1) T)).
    """
    params = np.asarray(params, dtype=np.float64)
    snapshot_steps = np.asarray(snapshot_steps, dtype=np.int64)
    if params.ndim != 2 or params.shape[0] != snapshot_steps.size:
        raise ValueError(
            f"params of shape {params.shape} do not match {snapshot_steps.size} snapshot steps: "
            "pass params as (snapshot, param)"
        )
    if params.shape[0] == 0:
        raise ValueError("no snapshots: record with snapshot_every > 0 to measure exploration")

    step_lengths = np.linalg.norm(np.diff(params, axis=0), axis=1)
    displacement_curve = np.linalg.norm(params - params[0], axis=1)

    cycles = np.empty(0, dtype=np.int64)
    path_per_cycle = np.empty(0)
    displacement_per_cycle = np.empty(0)
    if period is not None:
        if period < 1:
            raise ValueError(f"invalid period {period}: use the oscillation period in steps")
        cycle_of = snapshot_steps // period
        cycles = np.unique(cycle_of)
        path_per_cycle = np.empty(cycles.size)
        displacement_per_cycle = np.empty(cycles.size)
        for index, cycle in enumerate(cycles):
            inside = np.flatnonzero(cycle_of == cycle)
            first, last = inside[0], inside[-1]
            path_per_cycle[index] = step_lengths[first:last].sum()
            displacement_per_cycle[index] = np.linalg.norm(params[last] - params[first])

    return Exploration(
        path_length=float(step_lengths.sum()),
        displacement=float(displacement_curve[-1]),
        displacement_curve=displacement_curve,
        cycles=cycles,
        path_length_per_cycle=path_per_cycle,
        displacement_per_cycle=displacement_per_cycle,
        effective_dimension=effective_dimension(params),
    )


def effective_dimension(params: np.ndarray) -> float:
    """Return the participation ratio (sum l)^2 / sum l^2 of the snapshot covariance eigenvalues.

    The eigenvalues come from the (S, S) Gram matrix of the centred snapshots, which has the same
    nonzero eigenvalues as the (P, P) covariance and is cheap when S << P. A trajectory along a
    line gives 1; isotropic motion in d directions gives d. Returns nan for fewer than two
    snapshots or a trajectory that does not move.
    """
    params = np.asarray(params, dtype=np.float64)
    if params.shape[0] < 2:
        return float("nan")
    centred = params - params.mean(axis=0)
    eigenvalues = np.clip(np.linalg.eigvalsh(centred @ centred.T), 0.0, None)
    total = eigenvalues.sum()
    if total == 0.0:
        return float("nan")
    return float(total**2 / np.sum(eigenvalues**2))


def step_alignment(
    params: np.ndarray,
    snapshot_steps: np.ndarray,
    eigenvectors: np.ndarray,
    probe_steps: np.ndarray,
) -> StepAlignment:
    """Split each snapshot-to-snapshot step along and orthogonal to the top Hessian eigenvectors.

    Each step theta_{s+1} - theta_s uses the eigenvectors of the last probe at or before its
    start (the first probe for steps before any probe).

    Parameters
    ----------
    params : array_like, shape (S, P)
        Parameter snapshots.
    snapshot_steps : array_like of int, shape (S,)
        Step of each snapshot.
    eigenvectors : array_like, shape (probe, k, P)
        Orthonormal top eigenvectors recorded at each probe.
    probe_steps : array_like of int, shape (probe,)
        Step of each probe.
    """
    params = np.asarray(params, dtype=np.float64)
    eigenvectors = np.asarray(eigenvectors, dtype=np.float64)
    snapshot_steps = np.asarray(snapshot_steps, dtype=np.int64)
    probe_steps = np.asarray(probe_steps, dtype=np.int64)
    if eigenvectors.ndim != 3 or eigenvectors.shape[2] != params.shape[1]:
        raise ValueError(
            f"eigenvectors of shape {eigenvectors.shape} do not match {params.shape[1]} "
            "parameters: pass them as (probe, k, param)"
        )

    differences = np.diff(params, axis=0)
    starts = snapshot_steps[:-1]
    probe_index = np.clip(np.searchsorted(probe_steps, starts, side="right") - 1, 0, None)

    per_eigenvector = np.empty((differences.shape[0], eigenvectors.shape[1]))
    for row, (difference, index) in enumerate(zip(differences, probe_index, strict=True)):
        squared_norm = float(difference @ difference)
        projections = eigenvectors[index] @ difference
        if squared_norm == 0.0:
            per_eigenvector[row] = np.nan
        else:
            per_eigenvector[row] = projections**2 / squared_norm
    along = per_eigenvector.sum(axis=1)
    return StepAlignment(
        step=starts, along=along, orthogonal=1.0 - along, per_eigenvector=per_eigenvector
    )
