"""Tests of dynscope.curvature against dense float64 references and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from dynscope import curvature, losses, models

LOSS_NAMES = ("ce", "dce", "mse", "dmse1", "dmse2")
ACTIVATIONS = ("relu", "tanh", "gelu", "softplus")


def make_batch(
    count: int = 12, features: int = 3, classes: int = 3, seed: int = 0, dtype=torch.float64
) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, features, generator=generator, dtype=torch.float64).to(dtype)
    targets = torch.arange(count) % classes
    return inputs, targets


def make_loss(name: str, classes: int = 3) -> losses.ClassificationLoss:
    # amplitude 5, period 4, at step 5 the weights are far from 1 and differ across classes
    return losses.make_loss(name, classes, amplitude=5.0, period=4)


def reference_hessian(
    model: nn.Module, loss_fn, inputs: Tensor, targets: Tensor, step: int = 0
) -> Tensor:
    """Dense Hessian by torch.autograd.functional.hessian over the flat parameter vector."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [parameter.shape for _, parameter in model.named_parameters()]
    sizes = [parameter.numel() for _, parameter in model.named_parameters()]
    flat = models.flatten_parameters(model)

    def loss_of_flat(vector: Tensor) -> Tensor:
        pieces = torch.split(vector, sizes)
        parameters = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        outputs = torch.func.functional_call(model, parameters, (inputs.to(flat.dtype),))
        if isinstance(loss_fn, losses.ClassificationLoss):
            return loss_fn(outputs, targets, step=step)
        return loss_fn(outputs, targets)

    return torch.autograd.functional.hessian(loss_of_flat, flat)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def test_dense_hessian_matches_autograd():
    model = models.build_mlp(3, 3, width=5, depth=2, activation="tanh", seed=1)
    inputs, targets = make_batch()
    loss_fn = make_loss("dce")

    actual = curvature.dense_hessian(model, loss_fn, inputs, targets, step=5)

    expected = reference_hessian(model, loss_fn, inputs, targets, step=5)
    assert actual.dtype == torch.float64
    assert relative_error(actual, expected) < 1e-12


def test_hessian_accepts_plain_callable():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    inputs, _ = make_batch()
    targets = torch.randn(12, 2, dtype=torch.float64)

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        return ((outputs - targets) ** 4).mean()

    actual = curvature.hessian(model, loss_fn, inputs, targets)

    expected = reference_hessian(model, loss_fn, inputs, targets)
    assert relative_error(actual, expected) < 1e-12


def softmax_regression_hessian(weight: Tensor, bias: Tensor, inputs: Tensor) -> Tensor:
    """Closed form (1/N) sum_n kron(diag(p) - p p^T, x~ x~^T) in (weight, bias) order."""
    count, features = inputs.shape
    classes = weight.shape[0]
    probabilities = torch.softmax(inputs @ weight.T + bias, dim=1)
    extended = torch.cat([inputs, torch.ones(count, 1, dtype=inputs.dtype)], dim=1)
    augmented = torch.zeros(classes * (features + 1), classes * (features + 1), dtype=inputs.dtype)
    for p, x in zip(probabilities, extended, strict=True):
        output_hessian = torch.diag(p) - torch.outer(p, p)
        augmented += torch.kron(output_hessian, torch.outer(x, x)) / count

    # Row-major (class, feature + 1) order puts each bias after its class's weights; the
    # parameter vector holds all weights first, then the biases.
    order = [c * (features + 1) + j for c in range(classes) for j in range(features)]
    order += [c * (features + 1) + features for c in range(classes)]
    return augmented[order][:, order]


def test_hessian_softmax_regression_closed_form():
    model = models.build_mlp(4, 3, depth=0, seed=2)
    inputs, targets = make_batch(count=10, features=4)

    actual = curvature.hessian(model, losses.CrossEntropy(3), inputs, targets)

    linear = model.linears[0]
    expected = softmax_regression_hessian(linear.weight.detach(), linear.bias.detach(), inputs)
    assert relative_error(actual, expected) < 1e-12


def test_probe_full_matches_numpy():
    model = models.build_mlp(3, 3, width=6, depth=1, activation="relu", seed=3)
    inputs, targets = make_batch()
    loss_fn = make_loss("dmse2")

    result = curvature.probe(model, loss_fn, inputs, targets, 5, spectrum="full", eigenvectors=2)

    matrix = reference_hessian(model, loss_fn, inputs, targets, step=5).numpy()
    expected = np.sort(np.linalg.eigvalsh(matrix))[::-1]
    assert result.eigenvalues.shape == (matrix.shape[0],)
    assert np.allclose(result.eigenvalues, expected, rtol=0, atol=1e-12 * abs(expected).max())
    assert result.trace == pytest.approx(np.trace(matrix), rel=1e-12)
    assert result.eigenvectors is not None
    assert result.eigenvectors.shape == (2, matrix.shape[0])
    residual = matrix @ result.eigenvectors[0] - expected[0] * result.eigenvectors[0]
    assert np.linalg.norm(residual) < 1e-10 * abs(expected[0])


def test_probe_rejects_unknown_spectrum():
    model = models.build_mlp(3, 3, width=4, depth=1)
    inputs, targets = make_batch()
    with pytest.raises(ValueError, match="invalid spectrum"):
        curvature.probe(model, losses.CrossEntropy(3), inputs, targets, 0, spectrum="dense")


FAST_PATH_CASES = [("relu", 0)] + [
    (activation, depth) for activation in ACTIVATIONS for depth in (1, 2)
]


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize(("activation", "depth"), FAST_PATH_CASES)
def test_mlp_hessian_float64_matches_reference(name, activation, depth):
    model = models.build_mlp(2, 3, width=5, depth=depth, activation=activation, seed=4)
    inputs, targets = make_batch(features=2)
    loss_fn = make_loss(name)

    actual = curvature.hessian(model, loss_fn, inputs, targets, step=5)

    expected = reference_hessian(model, loss_fn, inputs, targets, step=5)
    assert actual.dtype == torch.float64
    assert relative_error(actual, expected) < 1e-10


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize(("activation", "depth"), FAST_PATH_CASES)
def test_mlp_hessian_float32_matches_reference(name, activation, depth):
    model = models.build_mlp(2, 3, width=5, depth=depth, activation=activation, seed=5)
    model32 = models.build_mlp(
        2, 3, width=5, depth=depth, activation=activation, seed=5, dtype=torch.float32
    )
    models.assign_parameters(model, models.flatten_parameters(model32).double())
    inputs, targets = make_batch(features=2)
    loss_fn = make_loss(name)

    actual = curvature.hessian(model32, loss_fn, inputs.float(), targets, step=5)

    expected = reference_hessian(model, loss_fn, inputs.float().double(), targets, step=5)
    assert actual.dtype == torch.float32
    assert relative_error(actual, expected) < 1e-5
