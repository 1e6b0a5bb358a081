"""Estimate eigenvalues and traces of a symmetric operator given only matrix-vector products.

Every function takes ``matvec``, a callable mapping a (P,) vector to H times it, so the same code
runs on Hessian-vector products and on explicit matrices in tests. The Lanczos basis and all
reductions are kept in float64 whatever the dtype of the products, so a float32 Hessian-vector
product limits the accuracy to about 1e-6 relative, not the algorithm.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LanczosResult:
    """Largest eigenpairs found by Lanczos.

    Attributes
    ----------
    eigenvalues
        float64 (k,), the largest Ritz values, descending.
    eigenvectors
        float64 (k, P), unit Ritz vectors as rows, in the order of ``eigenvalues``.
    residuals
        float64 (k,), ``||H v - lambda v||`` computed from the stored products H q_j.
    matvecs
        Number of products with H.
    converged
        Whether every residual reached ``tol`` times the largest Ritz value in magnitude.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residuals: np.ndarray
    matvecs: int
    converged: bool


@dataclass(frozen=True)
class PowerIterationResult:
    """Dominant eigenpair found by power iteration.

    Attributes
    ----------
    eigenvalue
        The Rayleigh quotient of the last iterate (the eigenvalue largest in magnitude).
    eigenvector
        float64 (P,), unit vector.
    matvecs
        Number of products with H.
    converged
        Whether the relative change of the eigenvalue fell below ``tol``.
    """

    eigenvalue: float
    eigenvector: np.ndarray
    matvecs: int
    converged: bool


@dataclass(frozen=True)
class TraceEstimate:
    """Trace of a symmetric operator, exact or estimated from random probes.

    Attributes
    ----------
    value
        The trace or its estimate.
    standard_error
        Standard error of a random estimate (the sample standard deviation of the Hutchinson
        terms over the square root of their number); 0 for an exact trace.
    matvecs
        Number of products with H (0 when the diagonal was computed directly).
    method
        ``"exact"``, ``"hutchinson"`` or ``"hutch++"``.
    """

    value: float
    standard_error: float
    matvecs: int
    method: str


def lanczos(
    matvec: MatVec,
    size: int,
    k: int,
    *,
    tol: float = 1e-6,
    max_iterations: int | None = None,
    start: Tensor | None = None,
    seed: int = 0,
) -> LanczosResult:
    """Find the k largest eigenvalues of a symmetric operator by Lanczos iteration.

    Every new Lanczos vector is reorthogonalised twice against the whole basis (classical
    Gram-Schmidt, repeated), which costs O(m P) per step but keeps the basis orthogonal to
    rounding, so no spurious copies of converged eigenvalues appear.

    Parameters
    ----------
    matvec
        Function returning H v for a (P,) vector v.
    size
        Dimension P.
    k
        Number of eigenvalues, 1 <= k <= P.
    tol
        Stop when every residual ``||H v - theta v||`` of the top k Ritz pairs is at most ``tol``
        times the largest Ritz value in magnitude.
    max_iterations
        Maximum basis size; default ``min(P, 50 + 20 k)``. Memory is two (m, P) float64 arrays.
    start
        Initial vector, for example the top eigenvector of the previous probe (a warm start);
        default a random normal vector drawn from ``seed``.
    seed
        Seed of the random start and of restarts after an invariant subspace was found.

    Returns
    -------
    LanczosResult
        Eigenvalues descending, eigenvectors, residuals and the number of products.
    """
    if not 1 <= k <= size:
        raise ValueError(f"invalid k {k!r}: use 1 <= k <= {size}, the operator's dimension")
    if not tol > 0:
        raise ValueError(f"invalid tol {tol!r}: use a tolerance above 0")
    limit = min(size, 50 + 20 * k) if max_iterations is None else min(size, max_iterations)
    if limit < k:
        raise ValueError(f"invalid max_iterations {max_iterations!r}: use at least k = {k}")
    generator = torch.Generator().manual_seed(seed)

    # Vectors stay in torch, because NumPy's OpenBLAS threads keep spinning after each call and
    # slow the torch operations of the next product. Only the small tridiagonal is stored in
    # NumPy, and `_ritz` diagonalises it with torch.
    basis = torch.zeros(limit, size, dtype=torch.float64)
    products = torch.zeros(limit, size, dtype=torch.float64)
    tridiagonal = np.zeros((limit, limit))
    if start is None:
        vector = torch.randn(size, generator=generator, dtype=torch.float64)
    else:
        vector = start.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    norm = float(vector.norm())
    if not (norm > 0 and math.isfinite(norm)):
        raise ValueError("invalid start vector: use a finite vector that is not zero")
    basis[0] = vector / norm

    converged = False
    restarted = False
    count = 0
    previous_beta = 0.0
    for index in range(limit):
        product = _apply(matvec, basis[index])
        products[index] = product
        count = index + 1
        alpha = float(basis[index] @ product)
        tridiagonal[index, index] = alpha
        residual = product - alpha * basis[index]
        if index > 0:
            residual -= previous_beta * basis[index - 1]
        active = basis[:count]
        for _ in range(2):
            residual -= active.T @ (active @ residual)
        beta = float(residual.norm())
        scale = float(np.abs(np.diagonal(tridiagonal)[:count]).max())
        invariant = beta <= 1e-12 * max(scale, np.finfo(np.float64).tiny)

        # An invariant subspace (beta = 0) has exact Ritz pairs, but a repeated eigenvalue shows
        # up only once in it. After one, the iteration runs on to the basis limit, restarting
        # in fresh directions, so that the copies are found.
        # NOTE: a repeated eigenvalue whose Ritz value converges before the space becomes
        # invariant is still returned once; finding every copy then needs block Lanczos.
        if count >= k and not invariant and not restarted:
            values, _, bounds = _ritz(tridiagonal[:count, :count], beta, k)
            scale = max(float(np.abs(values).max()), np.finfo(np.float64).tiny)
            if bool(np.all(bounds <= tol * scale)):
                converged = True
                break
        if count == limit:
            break
        if invariant:
            residual = torch.randn(size, generator=generator, dtype=torch.float64)
            for _ in range(2):
                residual -= active.T @ (active @ residual)
            previous_beta = 0.0
            restarted = True
            basis[count] = residual / residual.norm()
            continue
        tridiagonal[count, index] = tridiagonal[index, count] = beta
        previous_beta = beta
        basis[count] = residual / beta

    if count == size:
        converged = True
    elif restarted and count >= k:
        values, _, bounds = _ritz(tridiagonal[:count, :count], beta, k)
        scale = max(float(np.abs(values).max()), np.finfo(np.float64).tiny)
        converged = bool(np.all(bounds <= tol * scale))
    values, vectors, _ = _ritz(tridiagonal[:count, :count], 0.0, k)
    coefficients = torch.from_numpy(np.ascontiguousarray(vectors.T))  # (k, m)
    ritz_vectors = coefficients @ basis[:count]
    ritz_products = coefficients @ products[:count]
    residual_norms = (ritz_products - torch.from_numpy(values)[:, None] * ritz_vectors).norm(dim=1)
    if not converged:
        logger.warning(
            "Lanczos did not reach tol %.1e in %d products; the largest residual is %.3e",
            tol,
            count,
            float(residual_norms.max()),
        )
    return LanczosResult(
        eigenvalues=values,
        eigenvectors=ritz_vectors.numpy(),
        residuals=residual_norms.numpy(),
        matvecs=count,
        converged=converged,
    )


def _ritz(
    tridiagonal: np.ndarray, last_beta: float, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the top k Ritz values (descending), their vectors in the basis and error bounds."""
    # torch's LAPACK, not NumPy's: see the note on OpenBLAS threads in `lanczos`.
    values_tensor, vectors_tensor = torch.linalg.eigh(torch.from_numpy(tridiagonal))
    values, vectors = values_tensor.numpy(), vectors_tensor.numpy()
    order = np.argsort(values)[::-1][:k]
    bounds = abs(last_beta) * np.abs(vectors[-1, order])
    return values[order], vectors[:, order], bounds


def _apply(matvec: MatVec, vector: Tensor) -> Tensor:
    return matvec(vector).detach().reshape(-1).to(device="cpu", dtype=torch.float64)


def power_iteration(
    matvec: MatVec,
    size: int,
    *,
    tol: float = 1e-6,
    max_iterations: int = 1000,
    seed: int = 0,
) -> PowerIterationResult:
    """Find the eigenvalue largest in magnitude by power iteration.

    Stops when the Rayleigh quotient changes by less than ``tol * (|previous| + 1e-6)`` between
    two iterations, the rule of the ``eigenvalues`` method in PyHessian
    (``pyhessian/hessian.py``). This is a weaker test than a residual bound. Convergence is slow
    when the two largest eigenvalues are close in magnitude.
    """
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(size, generator=generator, dtype=torch.float64)
    vector /= vector.norm()
    eigenvalue = math.nan
    for iteration in range(1, max_iterations + 1):
        product = _apply(matvec, vector)
        estimate = float(vector @ product)
        vector = product / product.norm()
        if math.isfinite(eigenvalue) and abs(estimate - eigenvalue) < tol * (
            abs(eigenvalue) + 1e-6
        ):
            return PowerIterationResult(estimate, vector.numpy(), iteration, True)
        eigenvalue = estimate
    return PowerIterationResult(eigenvalue, vector.numpy(), max_iterations, False)


def hutchinson(matvec: MatVec, size: int, samples: int, *, seed: int = 0) -> TraceEstimate:
    """Estimate the trace as the mean of z^T H z over Rademacher vectors z."""
    if samples < 2:
        raise ValueError(f"invalid samples {samples!r}: use at least 2 to get a standard error")
    generator = torch.Generator().manual_seed(seed)
    probes = _rademacher(samples, size, generator)
    terms = torch.stack([probe @ _apply(matvec, probe) for probe in probes])
    return TraceEstimate(
        value=float(terms.mean()),
        standard_error=float(terms.std() / math.sqrt(samples)),
        matvecs=samples,
        method="hutchinson",
    )


def hutch_plus_plus(matvec: MatVec, size: int, samples: int, *, seed: int = 0) -> TraceEstimate:
    """Estimate the trace by Hutch++ with about ``samples`` products.

    A third of the products sketch the dominant range Q of H, and a third give the exact trace
    of Q^T H Q. Hutchinson with the remaining third estimates the trace of the deflated rest
    (Meyer, Musco, Musco and Woodruff, "Hutch++", SOSA 2021). The standard error is that of the
    Hutchinson part, conditional on the sketch.
    """
    third = samples // 3
    if third < 2:
        raise ValueError(f"invalid samples {samples!r}: Hutch++ needs at least 6 products")
    generator = torch.Generator().manual_seed(seed)
    sketch = _rademacher(third, size, generator)
    probes = _rademacher(third, size, generator)

    range_products = torch.stack([_apply(matvec, vector) for vector in sketch])
    basis, _ = torch.linalg.qr(range_products.T)  # (P, third), orthonormal columns
    basis_products = torch.stack([_apply(matvec, column) for column in basis.T])
    exact_part = float(torch.einsum("ip,pi->", basis_products, basis))

    deflated = probes - (probes @ basis) @ basis.T
    terms = torch.stack([vector @ _apply(matvec, vector) for vector in deflated])
    return TraceEstimate(
        value=exact_part + float(terms.mean()),
        standard_error=float(terms.std() / math.sqrt(third)),
        matvecs=3 * third,
        method="hutch++",
    )


def _rademacher(count: int, size: int, generator: torch.Generator) -> Tensor:
    signs = torch.randint(0, 2, (count, size), generator=generator, dtype=torch.int64)
    return (2 * signs - 1).to(torch.float64)
