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
    # parameter vector stores all weights first, then the biases.
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


def test_mlp_hessian_skips_torch_func(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the MLP path must not call torch.func.hessian")

    monkeypatch.setattr(torch.func, "hessian", fail)
    model = models.build_mlp(2, 3, width=4, depth=1)
    inputs, targets = make_batch(features=2)

    result = curvature.hessian(model, make_loss("dce"), inputs, targets, step=5)

    assert result.shape == (27, 27)


def test_subclassed_loss_uses_torch_func():
    class ScaledCrossEntropy(losses.CrossEntropy):
        def forward(self, outputs: Tensor, targets: Tensor, step: int = 0) -> Tensor:
            return 3.0 * super().forward(outputs, targets, step)

    model = models.build_mlp(2, 3, width=4, depth=1, seed=10)
    inputs, targets = make_batch(features=2)
    loss_fn = ScaledCrossEntropy(3)

    actual = curvature.hessian(model, loss_fn, inputs, targets)

    expected = reference_hessian(model, loss_fn, inputs, targets)
    assert relative_error(actual, expected) < 1e-12


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


def random_symmetric(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((size, size))
    return (matrix + matrix.T) / 2


def matrix_product(matrix: np.ndarray):
    tensor = torch.from_numpy(matrix)
    return lambda vector: tensor @ vector


def test_lanczos_matches_numpy_eigvalsh():
    matrix = random_symmetric(80, seed=0)

    result = curvature.lanczos(matrix_product(matrix), 80, 5, tol=1e-10)

    expected = np.sort(np.linalg.eigvalsh(matrix))[::-1][:5]
    assert result.converged
    assert np.allclose(result.eigenvalues, expected, rtol=1e-9, atol=0)
    assert np.all(result.residuals < 1e-8 * abs(expected[0]))


def test_lanczos_residuals_are_true_residuals():
    matrix = random_symmetric(60, seed=1)

    result = curvature.lanczos(matrix_product(matrix), 60, 3, tol=1e-4)

    vectors = result.eigenvectors
    direct = np.linalg.norm(vectors @ matrix - result.eigenvalues[:, None] * vectors, axis=1)
    assert np.allclose(result.residuals, direct, rtol=1e-6, atol=1e-12)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_lanczos_warm_start_exact_eigenvector():
    # A start that is already an eigenvector spans an invariant subspace at once; Lanczos must
    # restart from a fresh direction to find the other eigenvalues.
    values = np.array([5.0, 3.0, 2.0, 1.0, -4.0, 0.5])
    rng = np.random.default_rng(2)
    rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    matrix = rotation @ np.diag(values) @ rotation.T

    start = torch.from_numpy(rotation[:, 0].copy())
    result = curvature.lanczos(matrix_product(matrix), 6, 3, tol=1e-10, start=start)

    assert np.allclose(result.eigenvalues, [5.0, 3.0, 2.0], rtol=1e-9)


def test_lanczos_rejects_k_above_size():
    with pytest.raises(ValueError, match="invalid k"):
        curvature.lanczos(matrix_product(np.eye(3)), 3, 4)


def test_top_eigenvalues_match_dense_hessian():
    model = models.build_mlp(2, 3, width=8, depth=1, activation="tanh", seed=6)
    inputs, targets = make_batch(count=20, features=2)
    loss_fn = make_loss("dce")

    result = curvature.top_eigenvalues(model, loss_fn, inputs, targets, 5, k=4, tol=1e-10)

    matrix = reference_hessian(model, loss_fn, inputs, targets, step=5).numpy()
    expected = np.sort(np.linalg.eigvalsh(matrix))[::-1][:4]
    assert result.converged
    assert np.allclose(result.eigenvalues, expected, rtol=1e-8, atol=0)


def test_probe_topk_warm_start():
    model = models.build_mlp(2, 3, width=8, depth=1, activation="relu", seed=7)
    inputs, targets = make_batch(count=20, features=2)
    loss_fn = make_loss("mse")
    first = curvature.probe(model, loss_fn, inputs, targets, 0, spectrum="topk", topk=3)
    cold = curvature.probe(
        model, loss_fn, inputs, targets, 0, spectrum="topk", topk=1, eigenvectors=1
    )

    warm = curvature.probe(
        model, loss_fn, inputs, targets, 0, spectrum="topk", topk=1, previous=cold
    )

    matrix = reference_hessian(model, loss_fn, inputs, targets).numpy()
    expected = np.sort(np.linalg.eigvalsh(matrix))[::-1]
    assert np.allclose(first.eigenvalues, expected[:3], rtol=1e-5)
    assert first.residuals is not None
    assert first.residuals.shape == (3,)
    assert first.trace == pytest.approx(np.trace(matrix), rel=1e-12)
    assert warm.eigenvalues[0] == pytest.approx(expected[0], rel=1e-6)
    assert warm.residuals is not None
    assert warm.residuals[0] < 1e-5 * expected[0]


def test_power_iteration_finds_dominant_eigenvalue():
    values = np.array([10.0, 6.0, 1.0, -2.0])
    rotation, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((4, 4)))
    matrix = rotation @ np.diag(values) @ rotation.T

    result = curvature.power_iteration(matrix_product(matrix), 4, tol=1e-12)

    assert result.converged
    assert result.eigenvalue == pytest.approx(10.0, rel=1e-9)


def test_hutchinson_within_standard_errors():
    matrix = random_symmetric(50, seed=4) + 20 * np.eye(50)
    exact = np.trace(matrix)

    estimate = curvature.hutchinson(matrix_product(matrix), 50, 200, seed=1)

    assert estimate.standard_error > 0
    assert abs(estimate.value - exact) < 4 * estimate.standard_error


def test_hutch_plus_plus_within_standard_errors():
    # A spectrum dominated by a few large eigenvalues, where Hutch++ beats Hutchinson.
    rng = np.random.default_rng(5)
    rotation, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    values = np.concatenate([[100.0, 50.0, 30.0], rng.uniform(-1.0, 1.0, 57)])
    matrix = rotation @ np.diag(values) @ rotation.T
    exact = values.sum()

    estimate = curvature.hutch_plus_plus(matrix_product(matrix), 60, 60, seed=2)
    plain = curvature.hutchinson(matrix_product(matrix), 60, 60, seed=2)

    assert abs(estimate.value - exact) < 4 * estimate.standard_error
    assert estimate.standard_error < plain.standard_error


@pytest.mark.parametrize("method", ["exact", "hutchinson", "hutch++"])
def test_hessian_trace_methods(method):
    model = models.build_mlp(2, 3, width=6, depth=2, activation="softplus", seed=8)
    inputs, targets = make_batch(count=15, features=2)
    loss_fn = make_loss("dmse1")

    estimate = curvature.hessian_trace(
        model, loss_fn, inputs, targets, 5, method=method, samples=90, seed=3
    )

    exact = float(torch.trace(reference_hessian(model, loss_fn, inputs, targets, step=5)))
    assert estimate.method == method
    if method == "exact":
        assert estimate.value == pytest.approx(exact, rel=1e-12)
    else:
        assert abs(estimate.value - exact) < 4 * estimate.standard_error


def test_hessian_trace_exact_for_plain_callable():
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    inputs, targets = make_batch(features=2)

    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs, targets)

    estimate = curvature.hessian_trace(model, loss_fn, inputs, targets, method="exact")

    exact = float(torch.trace(reference_hessian(model, loss_fn, inputs, targets)))
    assert estimate.value == pytest.approx(exact, rel=1e-12)


def dense_ntk(model: nn.Module, inputs: Tensor) -> np.ndarray:
    names = [name for name, _ in model.named_parameters()]
    shapes = [parameter.shape for _, parameter in model.named_parameters()]
    sizes = [parameter.numel() for _, parameter in model.named_parameters()]

    def outputs_of(vector: Tensor) -> Tensor:
        pieces = torch.split(vector, sizes)
        parameters = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        return torch.func.functional_call(model, parameters, (inputs,)).reshape(-1)

    jacobian = torch.autograd.functional.jacobian(outputs_of, models.flatten_parameters(model))
    return (jacobian @ jacobian.T).numpy()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_ntk_eigenvalues_match_dense_gram(activation, depth):
    model = models.build_mlp(2, 3, width=5, depth=depth, activation=activation, seed=9)
    inputs, _ = make_batch(count=7, features=2)

    actual = curvature.ntk_eigenvalues(model, inputs, 6)

    expected = np.sort(np.linalg.eigvalsh(dense_ntk(model, inputs)))[::-1][:6]
    assert np.allclose(actual, expected, rtol=1e-10, atol=0)


def test_ntk_eigenvalues_generic_module():
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs, _ = make_batch(count=7, features=2)

    actual = curvature.ntk_eigenvalues(model, inputs, 4)

    expected = np.sort(np.linalg.eigvalsh(dense_ntk(model, inputs)))[::-1][:4]
    assert np.allclose(actual, expected, rtol=1e-10, atol=0)


def test_probe_rejects_too_many_eigenvectors():
    model = models.build_mlp(2, 3, width=2, depth=1)
    inputs, targets = make_batch(features=2)
    with pytest.raises(ValueError, match="invalid eigenvectors"):
        curvature.probe(model, losses.MSE(3), inputs, targets, 0, eigenvectors=100)


def test_hessian_vector_product_matches_dense():
    model = models.build_mlp(2, 3, width=6, depth=2, activation="gelu", seed=11)
    inputs, targets = make_batch(features=2)
    loss_fn = make_loss("dce")
    size = models.count_parameters(model)
    vector = torch.randn(size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    product = curvature.hessian_vector_product(model, loss_fn, inputs, targets, 5)(vector)

    expected = reference_hessian(model, loss_fn, inputs, targets, step=5) @ vector
    assert relative_error(product, expected) < 1e-12


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize(("activation", "depth"), FAST_PATH_CASES)
def test_mlp_product_float64_matches_reference(name, activation, depth):
    model = models.build_mlp(2, 3, width=5, depth=depth, activation=activation, seed=6)
    inputs, targets = make_batch(features=2)
    loss_fn = make_loss(name)
    size = models.count_parameters(model)
    vectors = torch.randn(3, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    product = curvature.hessian_vector_product(model, loss_fn, inputs, targets, 5)
    actual = torch.stack([product(vector) for vector in vectors])

    expected = vectors @ reference_hessian(model, loss_fn, inputs, targets, step=5)
    assert actual.dtype == torch.float64
    assert relative_error(actual, expected) < 1e-10


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize(("activation", "depth"), FAST_PATH_CASES)
def test_mlp_product_float32_matches_reference(name, activation, depth):
    model = models.build_mlp(2, 3, width=5, depth=depth, activation=activation, seed=7)
    model32 = models.build_mlp(
        2, 3, width=5, depth=depth, activation=activation, seed=7, dtype=torch.float32
    )
    models.assign_parameters(model, models.flatten_parameters(model32).double())
    inputs, targets = make_batch(features=2)
    loss_fn = make_loss(name)
    size = models.count_parameters(model)
    vector = torch.randn(size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    product = curvature.hessian_vector_product(model32, loss_fn, inputs.float(), targets, 5)
    actual = product(vector.float())

    reference = reference_hessian(model, loss_fn, inputs.float().double(), targets, step=5)
    assert actual.dtype == torch.float32
    assert relative_error(actual, reference @ vector) < 1e-5


def test_mlp_product_skips_torch_func(monkeypatch):
    def reject(*args, **kwargs):
        raise AssertionError("the MLP product must not call torch.func")

    monkeypatch.setattr(torch.func, "jvp", reject)
    monkeypatch.setattr(torch.func, "grad", reject)
    model = models.build_mlp(2, 3, width=4, depth=1, activation="relu", seed=8)
    inputs, targets = make_batch(features=2)
    product = curvature.hessian_vector_product(model, make_loss("ce"), inputs, targets)

    assert product(torch.ones(27, dtype=torch.float64)).shape == (27,)


def test_product_ignores_later_training_steps():
    model = models.build_mlp(2, 3, width=4, depth=1, activation="tanh", seed=9)
    inputs, targets = make_batch(features=2)
    loss_fn = make_loss("dmse1")
    vector = torch.ones(models.count_parameters(model), dtype=torch.float64)
    product = curvature.hessian_vector_product(model, loss_fn, inputs, targets, 5)
    before = product(vector)

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)

    assert torch.equal(product(vector), before)


def test_probe_topk_generic_module_estimates_trace():
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    inputs, targets = make_batch(count=20, features=2)
    loss_fn = losses.CrossEntropy(3)

    result = curvature.probe(model, loss_fn, inputs, targets, 0, spectrum="topk", topk=2)

    matrix = reference_hessian(model, loss_fn, inputs, targets).numpy()
    expected = np.sort(np.linalg.eigvalsh(matrix))[::-1][:2]
    assert result.method == "lanczos, hutch++ trace"
    assert np.allclose(result.eigenvalues, expected, rtol=1e-5)
    estimate = curvature.hessian_trace(model, loss_fn, inputs, targets, method="hutch++")
    assert result.trace == pytest.approx(estimate.value, rel=1e-12)
    assert abs(result.trace - np.trace(matrix)) < 4 * estimate.standard_error


def test_lanczos_finds_repeated_top_eigenvalue():
    # Few distinct eigenvalues, so the Krylov space becomes invariant after 4 steps, as for the
    # Hessian of a linear model whose output blocks repeat.
    rng = np.random.default_rng(3)
    levels = np.array([-1.0, 2.0, 3.5])
    eigenvalues = np.concatenate([[5.0, 5.0, 5.0], rng.choice(levels, size=197)])
    rotation, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    matrix = (rotation * eigenvalues) @ rotation.T

    result = curvature.lanczos(matrix_product(matrix), 200, 4, tol=1e-8)

    np.testing.assert_allclose(result.eigenvalues[:3], [5.0, 5.0, 5.0], rtol=1e-8)
    assert result.eigenvalues[3] == pytest.approx(levels.max(), rel=1e-8)


def test_top_eigenvalues_linear_model_repeated():
    model = models.build_mlp(2, 3, depth=0, seed=2)
    inputs, targets = make_batch(count=40, features=2)
    loss_fn = losses.MSE(3)

    result = curvature.top_eigenvalues(model, loss_fn, inputs, targets, k=4)

    expected = torch.linalg.eigvalsh(reference_hessian(model, loss_fn, inputs, targets)).flip(0)
    np.testing.assert_allclose(result.eigenvalues, expected[:4].numpy(), rtol=1e-8)


@pytest.mark.parametrize("shape", [(28,), (26,), (27, 1)])
@pytest.mark.parametrize("generic", [False, True])
def test_hessian_vector_product_rejects_wrong_shape(shape, generic):
    model = models.build_mlp(2, 3, width=4, depth=1, seed=8)
    loss_fn = make_loss("ce")
    if generic:  # a plain callable takes the torch.func path
        loss_fn = nn.CrossEntropyLoss()
    inputs, targets = make_batch(features=2)
    product = curvature.hessian_vector_product(model, loss_fn, inputs, targets)

    with pytest.raises(ValueError, match=r"invalid vector shape .*expected \(27,\)"):
        product(torch.ones(shape, dtype=torch.float64))
