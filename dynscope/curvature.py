"""Compute the curvature of a loss at a parameter point: Hessian, spectra, traces and the NTK.

The model is treated as a pure function of one flat parameter vector, flattened in
``model.parameters()`` order (weight before bias within each ``nn.Linear``). `hessian` returns the
exact dense (P, P) Hessian of the loss in the parameters' dtype. For a `dynscope.models.MLP`
under one of the five dynscope losses it assembles the Hessian layer by layer from closed forms.
For any other module or loss it falls back to ``torch.func.hessian``, which is exact but slower.

`probe` is what the recorder calls every ``hessian_every`` steps. ``spectrum="full"``
diagonalises the dense Hessian (memory P^2, time P^3, so it suits networks up to roughly 10^4
parameters); ``spectrum="topk"`` runs Lanczos on Hessian-vector products and never forms the
Hessian. Eigenvalues are sorted descending by value, so "top" means the largest algebraic
eigenvalues, not the largest in magnitude.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from dynscope import _functional, _mlp_hessian, losses, models
from dynscope._functional import LossFunction
from dynscope._lanczos import (
    LanczosResult,
    PowerIterationResult,
    TraceEstimate,
    hutch_plus_plus,
    hutchinson,
    lanczos,
    power_iteration,
)

logger = logging.getLogger(__name__)

Result = TypeVar("Result")

SPECTRA = ("full", "topk")
TRACE_METHODS = ("auto", "exact", "hutchinson", "hutch++")

__all__ = [
    "LanczosResult",
    "PowerIterationResult",
    "Spectrum",
    "TraceEstimate",
    "dense_hessian",
    "hessian",
    "hessian_trace",
    "hessian_vector_product",
    "hutch_plus_plus",
    "hutchinson",
    "lanczos",
    "ntk_eigenvalues",
    "power_iteration",
    "probe",
    "top_eigenvalues",
]


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of a Hessian at one probe, with optional eigenvectors and residuals.

    Attributes
    ----------
    eigenvalues
        float64 eigenvalues sorted descending (all P for a full spectrum, k for top-k).
    eigenvectors
        float64 array (k, P) whose rows are unit eigenvectors in the order of ``eigenvalues``,
        or None when none were requested.
    trace
        Trace of the Hessian: exact for a full spectrum and for an MLP, otherwise a Hutch++
        estimate (see ``method``).
    residuals
        Residual norms ``||H v - lambda v||`` of the returned eigenpairs (Lanczos), or None.
    method
        How the values were computed, for example ``"eigvalsh"`` or ``"lanczos"``.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray | None
    trace: float
    residuals: np.ndarray | None
    method: str

    @property
    def sharpness(self) -> float:
        """The largest eigenvalue."""
        return float(self.eigenvalues[0])


def hessian(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Tensor,
    targets: Tensor,
    step: int = 0,
) -> Tensor:
    """Compute the exact Hessian of the loss with respect to the flat parameter vector.

    Parameters
    ----------
    model
        The network; it must be a pure function of its parameters (see
        `dynscope.models.check_functional`).
    loss_fn
        A `dynscope.losses.ClassificationLoss`, called with ``step``, or any callable
        ``(outputs, targets) -> scalar Tensor``.
    inputs, targets
        The whole batch the loss is evaluated on. Inputs are converted to the parameters' dtype.
    step
        Training step, which sets the class weights of a dynamical loss.

    Returns
    -------
    torch.Tensor
        The symmetric (P, P) Hessian in the parameters' dtype, parameters flattened in
        ``model.parameters()`` order.
    """
    result = _mlp_closed_form(_mlp_hessian.mlp_hessian, model, loss_fn, inputs, targets, step)
    if result is not None:
        return result
    return dense_hessian(model, loss_fn, inputs, targets, step)


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Tensor,
    targets: Tensor,
    step: int = 0,
) -> Tensor:
    """Compute the exact Hessian with ``torch.func.hessian`` for any module and loss.

    Parameters and returns are those of `hessian`. This is the reference path: it works for any
    differentiable module and loss, and costs about P forward-over-reverse passes.
    """
    loss_of_flat, flat = _functional.flat_loss(model, loss_fn, inputs, targets, step)
    result = torch.func.hessian(loss_of_flat)(flat)
    return result.detach()


def probe(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Tensor,
    targets: Tensor,
    step: int,
    *,
    spectrum: str = "full",
    topk: int = 10,
    eigenvectors: int = 0,
    previous: Spectrum | None = None,
) -> Spectrum:
    """Measure the Hessian spectrum at the current parameters.

    Parameters
    ----------
    model, loss_fn, inputs, targets, step
        As in `hessian`.
    spectrum
        ``"full"``: all P eigenvalues of the dense Hessian. ``"topk"``: the ``topk`` largest by
        Lanczos on Hessian-vector products (residual tolerance 1e-6), with the trace from
        `hessian_trace` (exact for an MLP under a dynscope loss, otherwise a Hutch++ estimate
        from 30 more products).
    topk
        Number of eigenvalues for ``spectrum="topk"``.
    eigenvectors
        Number of top eigenvectors to return (0 for none).
    previous
        The spectrum of the previous probe. Its top eigenvector warm-starts Lanczos, so the
        previous probe must have been asked for at least one eigenvector.

    Returns
    -------
    Spectrum
        Eigenvalues descending, the trace and the requested eigenvectors.
    """
    if spectrum not in SPECTRA:
        raise ValueError(f"invalid spectrum {spectrum!r}: use one of {', '.join(SPECTRA)}")
    if eigenvectors < 0:
        raise ValueError(f"invalid eigenvectors {eigenvectors!r}: use a count >= 0")
    size = sum(parameter.numel() for parameter in model.parameters())
    if eigenvectors > size:
        raise ValueError(
            f"invalid eigenvectors {eigenvectors!r}: the model has {size} parameters, "
            "so ask for at most that many eigenvectors"
        )
    if spectrum == "full":
        return _full_spectrum(hessian(model, loss_fn, inputs, targets, step), eigenvectors)

    if eigenvectors > topk:
        raise ValueError(
            f"invalid eigenvectors {eigenvectors!r}: Lanczos finds topk = {topk} eigenpairs, "
            "so ask for at most topk eigenvectors"
        )
    start = None
    if previous is not None and previous.eigenvectors is not None:
        start = torch.from_numpy(previous.eigenvectors[0])
    result = top_eigenvalues(model, loss_fn, inputs, targets, step, k=topk, start=start)
    trace = hessian_trace(model, loss_fn, inputs, targets, step)
    return Spectrum(
        eigenvalues=result.eigenvalues,
        eigenvectors=result.eigenvectors[:eigenvectors] if eigenvectors else None,
        trace=trace.value,
        residuals=result.residuals,
        method=f"lanczos, {trace.method} trace",
    )


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Tensor,
    targets: Tensor,
    step: int = 0,
) -> Callable[[Tensor], Tensor]:
    """Build the map v -> H v at the current parameters, without forming H.

    For a `dynscope.models.MLP` under a dynscope loss, each product is one forward and one
    backward pass of directional derivatives written as matrix products (the R-operator), with
    the forward quantities computed once when the map is built. Otherwise each product is one
    forward-over-reverse pass (``torch.func.jvp`` of ``torch.func.grad``), about the cost of
    three gradient evaluations. The map keeps copies of what it needs, so later training steps
    do not change it.

    Parameters
    ----------
    model, loss_fn, inputs, targets, step
        As in `hessian`.

    Returns
    -------
    Callable
        A function from a (P,) vector to the (P,) product in the parameters' dtype.
    """
    structured = _mlp_closed_form(
        _mlp_hessian.mlp_hessian_vector_product, model, loss_fn, inputs, targets, step
    )
    if structured is not None:
        size = sum(parameter.numel() for parameter in model.parameters())
        weight = next(model.parameters())

        def structured_product(vector: Tensor) -> Tensor:
            _check_vector(vector, size)
            assert structured is not None
            return structured(vector.to(dtype=weight.dtype, device=weight.device))

        return structured_product

    loss_of_flat, flat = _functional.flat_loss(model, loss_fn, inputs, targets, step)
    gradient = torch.func.grad(loss_of_flat)

    def product(vector: Tensor) -> Tensor:
        _check_vector(vector, flat.numel())
        tangent = vector.to(dtype=flat.dtype, device=flat.device)
        return torch.func.jvp(gradient, (flat,), (tangent,))[1].detach()

    return product


def _check_vector(vector: Tensor, size: int) -> None:
    if vector.shape != (size,):
        raise ValueError(
            f"invalid vector shape {tuple(vector.shape)}: expected ({size},), one entry per "
            "parameter in model.parameters() order"
        )


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Tensor,
    targets: Tensor,
    step: int = 0,
    *,
    k: int = 10,
    tol: float = 1e-6,
    max_iterations: int | None = None,
    start: Tensor | None = None,
    seed: int = 0,
) -> LanczosResult:
    """Find the k largest Hessian eigenvalues by Lanczos on Hessian-vector products.

    Parameters
    ----------
    model, loss_fn, inputs, targets, step
        As in `hessian`.
    k, tol, max_iterations, start, seed
        As in `lanczos`: ``tol`` bounds each residual ``||H v - lambda v||`` relative to the
        largest eigenvalue in magnitude; ``start`` warm-starts from a previous eigenvector.

    Returns
    -------
    LanczosResult
        Eigenvalues descending, unit eigenvectors (k, P), residual norms and the product count.
    """
    size = sum(parameter.numel() for parameter in model.parameters())
    product = hessian_vector_product(model, loss_fn, inputs, targets, step)
    return lanczos(product, size, k, tol=tol, max_iterations=max_iterations, start=start, seed=seed)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Tensor,
    targets: Tensor,
    step: int = 0,
    *,
    method: str = "auto",
    samples: int = 30,
    seed: int = 0,
) -> TraceEstimate:
    """Compute or estimate the trace of the Hessian.

    Parameters
    ----------
    model, loss_fn, inputs, targets, step
        As in `hessian`.
    method
        ``"exact"`` sums the exact diagonal, which is cheap for an MLP under a dynscope loss
        and needs the dense Hessian otherwise. ``"hutchinson"`` and ``"hutch++"`` are random
        estimates from ``samples`` Hessian-vector products. ``"auto"`` is exact for an MLP
        under a dynscope loss and Hutch++ otherwise.
    samples
        Number of Hessian-vector products of a random estimate.
    seed
        Seed of the random probe vectors.

    Returns
    -------
    TraceEstimate
        The value with its standard error (0 when exact).
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"invalid method {method!r}: use one of {', '.join(TRACE_METHODS)}")
    fast = _mlp_hessian.mlp_linears(model) is not None and _mlp_hessian.is_closed_form_loss(loss_fn)
    if method == "exact" or (method == "auto" and fast):
        diagonal = _mlp_closed_form(
            _mlp_hessian.mlp_hessian_diagonal, model, loss_fn, inputs, targets, step
        )
        if diagonal is None:
            diagonal = torch.diagonal(dense_hessian(model, loss_fn, inputs, targets, step))
        return TraceEstimate(float(diagonal.double().sum()), 0.0, 0, "exact")

    size = sum(parameter.numel() for parameter in model.parameters())
    product = hessian_vector_product(model, loss_fn, inputs, targets, step)
    if method == "hutchinson":
        return hutchinson(product, size, samples, seed=seed)
    return hutch_plus_plus(product, size, samples, seed=seed)


def ntk_eigenvalues(model: nn.Module, inputs: Tensor, k: int) -> np.ndarray:
    """Compute the k largest eigenvalues of the empirical neural tangent kernel.

    The kernel is the (N C, N C) Gram matrix J J^T of the per-sample output Jacobians J with
    respect to all parameters. For a `dynscope.models.MLP` it is summed layer by layer from
    products of smaller Gram matrices; for other modules J comes from ``torch.func.jacrev``.

    Parameters
    ----------
    model
        The network, a pure function of its parameters.
    inputs
        Inputs (N, D), converted to the parameters' dtype.
    k
        Number of eigenvalues, 1 <= k <= N C.

    Returns
    -------
    numpy.ndarray
        float64 (k,), descending.
    """
    parameter = next(model.parameters())
    inputs = inputs.to(dtype=parameter.dtype, device=parameter.device)
    linears = _mlp_hessian.mlp_linears(model)
    if linears is not None:
        assert isinstance(model, models.MLP)
        gram = _mlp_hessian.mlp_ntk(linears, model.activation, inputs)
    else:
        jacobian = _functional.output_jacobian(model, inputs)
        gram = jacobian @ jacobian.T
    if not 1 <= k <= gram.shape[0]:
        raise ValueError(
            f"invalid k {k!r}: the NTK has {gram.shape[0]} eigenvalues (samples times outputs), "
            "so use 1 <= k <= that"
        )
    values = torch.linalg.eigvalsh(gram)
    return values.flip(0)[:k].double().cpu().numpy()


def _mlp_closed_form(
    builder: Callable[..., Result],
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Tensor,
    targets: Tensor,
    step: int,
) -> Result | None:
    """Call a builder of `dynscope._mlp_hessian` for an MLP under a dynscope loss, else None.

    The builder gets the MLP's layers, its activation, the loss, the inputs in the parameters'
    dtype and device, the targets and the step.
    """
    linears = _mlp_hessian.mlp_linears(model)
    if linears is None or not _mlp_hessian.is_closed_form_loss(loss_fn):
        return None
    assert isinstance(model, models.MLP)
    assert isinstance(loss_fn, losses.ClassificationLoss)
    weight = linears[0].weight
    return builder(
        linears,
        model.activation,
        loss_fn,
        inputs.to(dtype=weight.dtype, device=weight.device),
        targets.to(device=weight.device),
        step,
    )


def _full_spectrum(matrix: Tensor, eigenvectors: int) -> Spectrum:
    """Diagonalise a dense symmetric matrix in its own dtype, eigenvalues descending."""
    trace = float(torch.diagonal(matrix).sum())
    if eigenvectors == 0:
        values = torch.linalg.eigvalsh(matrix)
        return Spectrum(
            eigenvalues=values.flip(0).double().cpu().numpy(),
            eigenvectors=None,
            trace=trace,
            residuals=None,
            method="eigvalsh",
        )
    values, vectors = torch.linalg.eigh(matrix)
    values = values.flip(0)
    vectors = vectors.flip(1)[:, :eigenvectors].T
    return Spectrum(
        eigenvalues=values.double().cpu().numpy(),
        eigenvectors=vectors.double().cpu().numpy(),
        trace=trace,
        residuals=None,
        method="eigh",
    )
