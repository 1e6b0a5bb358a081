"""Tests of the dynamical-loss schedules and losses against closed forms and finite differences."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynscope.losses import (
    LOSSES,
    MSE,
    CrossEntropy,
    DynamicalCrossEntropy,
    DynamicalMSE,
    gamma,
    make_loss,
    weighted_loss,
)

SETTINGS = settings(max_examples=60, deadline=None)

schedules = st.sampled_from(["triangle", "sine", "square", "custom"])
class_orders = st.sampled_from(["sequential", "random"])


def custom_schedule(phase: float) -> float:
    return 1.0 + 5.0 * phase**2


def resolve(schedule: str):
    return custom_schedule if schedule == "custom" else schedule


def random_batch(
    num_samples: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    outputs = torch.randn(num_samples, num_classes, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return outputs, targets


# --- schedules -------------------------------------------------------------------------------


def test_triangle_reference_values():
    middle = gamma(2500, 3, 70.0, 5000)
    np.testing.assert_allclose(middle, [3 * 70 / 72, 3 / 72, 3 / 72], rtol=1e-12)
    assert middle[0] == pytest.approx(2.916667, abs=1e-6)
    assert middle[1] == pytest.approx(0.041667, abs=1e-6)
    np.testing.assert_array_equal(gamma(0, 3, 70.0, 5000), np.ones(3))


def test_triangle_closed_form_both_halves():
    amplitude, period = 9.0, 100
    for tau in (10, 49, 50, 51, 90):
        phase = tau / period
        if phase < 0.5:
            raw = 1 + 2 * (amplitude - 1) * phase
        else:
            raw = 2 * amplitude - 1 - 2 * (amplitude - 1) * phase
        expected = 2 * np.array([raw, 1.0]) / (raw + 1.0)
        np.testing.assert_allclose(gamma(tau, 2, amplitude, period), expected, rtol=1e-13)


def test_sine_closed_form():
    amplitude, period, tau = 5.0, 40, 7
    raw = 1 + (amplitude - 1) * math.sin(math.pi * tau / period) ** 2
    expected = 4 * np.array([raw, 1, 1, 1]) / (raw + 3)
    np.testing.assert_allclose(gamma(tau, 4, amplitude, period, "sine"), expected, rtol=1e-13)


def test_square_middle_half_only():
    period = 8
    focus = [gamma(tau, 2, 3.0, period, "square")[0] for tau in range(period)]
    high = 2 * 3.0 / 4.0
    np.testing.assert_allclose(focus, [1, 1, high, high, high, high, 1, 1], rtol=1e-14)


def test_focus_class_sequential_order():
    steps = np.arange(0, 7 * 10, 10) + 5
    weights = gamma(steps, 3, 4.0, 10)
    np.testing.assert_array_equal(weights.argmax(axis=1), [0, 1, 2, 0, 1, 2, 0])


def test_random_order_permutes_each_cycle():
    period, classes = 10, 4
    steps = np.arange(5, 6 * classes * period, period)
    focus = gamma(steps, classes, 4.0, period, class_order="random", seed=3).argmax(axis=1)
    for cycle in focus.reshape(-1, classes):
        assert sorted(cycle.tolist()) == list(range(classes))


def test_random_order_uniform_permutations():
    # 10,000 cycles of 3 classes: each of the 6 orders should appear 1667 +- 3 sigma (111) times.
    steps = 2 * np.arange(30_000) + 1
    focus = gamma(steps, 3, 5.0, 2, class_order="random", seed=1).argmax(axis=1)
    orders, counts = np.unique(focus.reshape(-1, 3), axis=0, return_counts=True)
    assert len(orders) == 6
    assert counts.min() > 10_000 / 6 - 111
    assert counts.max() < 10_000 / 6 + 111


def test_random_order_seed_reproducible():
    steps = np.arange(0, 4000, 7)
    first = gamma(steps, 5, 4.0, 10, class_order="random", seed=11)
    again = gamma(steps, 5, 4.0, 10, class_order="random", seed=11)
    other = gamma(steps, 5, 4.0, 10, class_order="random", seed=12)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_random_order_independent_of_request():
    steps = np.arange(0, 3000, 3)
    whole = gamma(steps, 4, 4.0, 10, class_order="random", seed=5)
    second_half = gamma(steps[500:], 4, 4.0, 10, class_order="random", seed=5)
    np.testing.assert_array_equal(whole[500:], second_half)


def test_static_tail_gives_ones():
    weights = gamma(np.arange(100), 3, 10.0, 10, static_tail=15, total_steps=100)
    np.testing.assert_array_equal(weights[85:], np.ones((15, 3)))
    assert not np.allclose(weights[84], 1.0)


def test_static_tail_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        gamma(3, 3, 10.0, 10, static_tail=5)


def test_vectorised_matches_scalar_steps():
    steps = np.arange(0, 400, 3)
    for schedule in ("triangle", "sine", "square", custom_schedule):
        batch = gamma(steps, 3, 7.0, 25, schedule, class_order="random", seed=2)
        for row, step in zip(batch, steps, strict=True):
            np.testing.assert_array_equal(
                row, gamma(int(step), 3, 7.0, 25, schedule, class_order="random", seed=2)
            )


def test_gamma_20000_steps_fast():
    start = time.perf_counter()
    weights = gamma(np.arange(20_000), 3, 70.0, 5000, class_order="random")
    elapsed = time.perf_counter() - start
    assert weights.shape == (20_000, 3)
    assert elapsed < 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"amplitude": 0.5}, "amplitude"),
        ({"amplitude": math.nan}, "amplitude"),
        ({"period": 0}, "period"),
        ({"schedule": "cosine"}, "schedule"),
        ({"class_order": "shuffled"}, "class_order"),
        ({"step": -1}, "step"),
        ({"step": 1.5}, "step"),
        ({"seed": -1, "class_order": "random"}, "seed"),
        ({"schedule": lambda phase: -1.0}, "raw weight"),
    ],
)
def test_gamma_invalid_options_raise(options, message):
    arguments = {"step": 3, "num_classes": 3, "amplitude": 5.0, "period": 10} | options
    with pytest.raises(ValueError, match=message):
        gamma(**arguments)


@SETTINGS
@given(
    step=st.integers(0, 10**7),
    num_classes=st.integers(2, 12),
    amplitude=st.floats(1.0, 1000.0),
    period=st.integers(1, 10_000),
    schedule=schedules,
    class_order=class_orders,
    seed=st.integers(0, 2**16),
)
def test_gamma_positive_sums_to_classes(
    step, num_classes, amplitude, period, schedule, class_order, seed
):
    weights = gamma(
        step, num_classes, amplitude, period, resolve(schedule), class_order=class_order, seed=seed
    )
    assert weights.shape == (num_classes,)
    assert np.all(weights > 0)
    assert weights.sum() == pytest.approx(num_classes, rel=1e-12)


@SETTINGS
@given(
    step=st.integers(0, 10**7),
    num_classes=st.integers(2, 12),
    period=st.integers(1, 10_000),
    schedule=st.sampled_from(["triangle", "sine", "square"]),
    class_order=class_orders,
)
def test_amplitude_one_gives_ones(step, num_classes, period, schedule, class_order):
    weights = gamma(step, num_classes, 1.0, period, schedule, class_order=class_order)
    np.testing.assert_array_equal(weights, np.ones(num_classes))


@SETTINGS
@given(
    num_classes=st.integers(2, 8),
    amplitude=st.floats(1.0, 200.0),
    period=st.integers(2, 1000),
    schedule=st.sampled_from(["triangle", "sine"]),
)
def test_built_in_shapes_peak_midperiod(num_classes, amplitude, period, schedule):
    # Only even periods have a step exactly at tau = T/2, where the raw weight is A.
    period = 2 * (period // 2)
    weights = gamma(period // 2, num_classes, amplitude, period, schedule)
    expected = num_classes * amplitude / (amplitude + num_classes - 1)
    assert weights[0] == pytest.approx(expected, rel=1e-12)


# --- losses ----------------------------------------------------------------------------------


def test_ce_hand_computation():
    outputs = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    first = -2.0 + math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))
    second = -0.0 + math.log(2 * math.exp(0.5) + 1.0)
    gamma_values = torch.tensor([2.0, 0.5, 0.5], dtype=torch.float64)
    ce = weighted_loss("ce", outputs, targets, gamma_values).item()
    dce = weighted_loss("dce", outputs, targets, gamma_values).item()
    assert ce == pytest.approx((first + second) / 2, rel=1e-14)
    assert dce == pytest.approx((2.0 * first + 0.5 * second) / 2, rel=1e-14)


def test_mse_family_hand_computation():
    outputs = torch.tensor([[0.5, 0.0, 1.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1])
    gamma_values = torch.tensor([1.5, 0.5, 1.0], dtype=torch.float64)
    # residuals: sample 0 (-0.5, 0, 1), sample 1 (0, 1, 0)
    mse = weighted_loss("mse", outputs, targets, gamma_values).item()
    dmse1 = weighted_loss("dmse1", outputs, targets, gamma_values).item()
    dmse2 = weighted_loss("dmse2", outputs, targets, gamma_values).item()
    assert mse == pytest.approx((1.25 + 1.0) / 2, rel=1e-14)
    assert dmse1 == pytest.approx((1.5 * 1.25 + 0.5 * 1.0) / 2, rel=1e-14)
    assert dmse2 == pytest.approx((1.5 * 0.25 + 1.0 * 1.0 + 0.5 * 1.0) / 2, rel=1e-14)


def test_static_names_ignore_gamma():
    outputs, targets = random_batch(10, 3, seed=0)
    weights = torch.tensor([3.0, 0.1, 0.2], dtype=torch.float64)
    for name in ("ce", "mse"):
        with_weights = weighted_loss(name, outputs, targets, weights)
        with_ones = weighted_loss(name, outputs, targets, torch.ones(3, dtype=torch.float64))
        assert torch.equal(with_weights, with_ones)


def test_module_matches_weighted_loss():
    outputs, targets = random_batch(12, 4, seed=1)
    for name in LOSSES:
        loss = make_loss(name, 4, amplitude=20.0, period=10, class_order="random", seed=4)
        for step in (0, 13, 57):
            expected = weighted_loss(name, outputs, targets, torch.from_numpy(loss.gamma_at(step)))
            assert torch.equal(loss(outputs, targets, step=step), expected)


def test_static_counterparts():
    assert DynamicalCrossEntropy(3, 5.0, 10).static().name == "ce"
    assert DynamicalMSE(3, 5.0, 10, variant=1).static().name == "mse"
    assert DynamicalMSE(3, 5.0, 10, variant=2).static().name == "mse"
    assert MSE(3).static().name == "mse"


def test_make_loss_names():
    for name in LOSSES:
        assert make_loss(name, 3, amplitude=2.0, period=5).name == name


def test_make_loss_unknown_name():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        make_loss("hinge", 3)


def test_static_loss_gamma_is_ones():
    np.testing.assert_array_equal(CrossEntropy(4).gamma_at(123), np.ones(4))
    np.testing.assert_array_equal(MSE(2).gamma_at(np.arange(5)), np.ones((5, 2)))


def test_static_loss_without_classes():
    outputs, targets = random_batch(6, 5, seed=2)
    value = CrossEntropy()(outputs, targets, step=9)
    expected = torch.nn.functional.cross_entropy(outputs, targets)
    assert torch.allclose(value, expected, rtol=1e-14, atol=0)


def test_dynamical_loss_wrong_columns():
    outputs, targets = random_batch(6, 4, seed=3)
    with pytest.raises(ValueError, match="num_classes=4"):
        DynamicalCrossEntropy(3, 5.0, 10)(outputs, targets, step=1)


def test_static_loss_wrong_columns():
    outputs, targets = random_batch(6, 4, seed=3)
    with pytest.raises(ValueError, match="num_classes=4"):
        MSE(3)(outputs, targets)


def test_invalid_variant_raises():
    with pytest.raises(ValueError, match="variant"):
        DynamicalMSE(3, 5.0, 10, variant=3)


def test_loss_in_plain_training_loop():
    torch.manual_seed(0)
    inputs = torch.randn(30, 2, dtype=torch.float64)
    targets = (inputs[:, 0] > 0).long()
    model = torch.nn.Linear(2, 2, dtype=torch.float64)
    loss_fn = DynamicalCrossEntropy(2, amplitude=5.0, period=20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    first = loss_fn.static()(model(inputs), targets).item()
    for step in range(100):
        optimizer.zero_grad()
        loss_fn(model(inputs), targets, step=step).backward()
        optimizer.step()
    assert loss_fn.static()(model(inputs), targets).item() < first


@SETTINGS
@given(
    num_classes=st.integers(2, 6),
    num_samples=st.integers(1, 20),
    step=st.integers(0, 1000),
    period=st.integers(1, 100),
    seed=st.integers(0, 1000),
)
def test_amplitude_one_equals_static(num_classes, num_samples, step, period, seed):
    outputs, targets = random_batch(num_samples, num_classes, seed)
    for name in ("dce", "dmse1", "dmse2"):
        loss = make_loss(name, num_classes, amplitude=1.0, period=period)
        static = loss.static()(outputs, targets)
        assert torch.allclose(loss(outputs, targets, step=step), static, rtol=1e-14, atol=0)


@SETTINGS
@given(
    num_classes=st.integers(2, 6),
    num_samples=st.integers(1, 20),
    step=st.integers(0, 10_000),
    amplitude=st.floats(1.0, 500.0),
    period=st.integers(1, 500),
    schedule=schedules,
    seed=st.integers(0, 1000),
)
def test_one_hot_outputs_zero_mse(
    num_classes, num_samples, step, amplitude, period, schedule, seed
):
    _, targets = random_batch(num_samples, num_classes, seed)
    outputs = torch.nn.functional.one_hot(targets, num_classes).to(torch.float64)
    for name in ("mse", "dmse1", "dmse2"):
        loss = make_loss(name, num_classes, amplitude, period, resolve(schedule))
        assert loss(outputs, targets, step=step).item() == 0.0


@SETTINGS
@given(
    num_classes=st.integers(2, 6),
    num_samples=st.integers(1, 20),
    step=st.integers(0, 10_000),
    amplitude=st.floats(1.0, 500.0),
    period=st.integers(1, 500),
    seed=st.integers(0, 1000),
)
def test_separating_logits_drive_ce_zero(num_classes, num_samples, step, amplitude, period, seed):
    _, targets = random_batch(num_samples, num_classes, seed)
    direction = torch.nn.functional.one_hot(targets, num_classes).to(torch.float64)
    for name in ("ce", "dce"):
        loss = make_loss(name, num_classes, amplitude, period)
        values = [loss(scale * direction, targets, step=step).item() for scale in range(0, 64, 4)]
        pairs = list(zip(values, values[1:], strict=False))
        # Up to scale 24 the loss exceeds float64 rounding of the logsumexp, so it must fall
        # strictly; beyond that it may round to exactly 0.
        assert all(later < earlier for earlier, later in pairs[:6])
        assert all(later <= earlier for earlier, later in pairs)
        assert values[-1] < 1e-20


@pytest.mark.parametrize("name", LOSSES)
def test_gradient_matches_finite_differences(name):
    outputs, targets = random_batch(5, 3, seed=7)
    outputs.requires_grad_(True)
    loss = make_loss(name, 3, amplitude=30.0, period=8, schedule="sine")
    assert torch.autograd.gradcheck(lambda x: loss(x, targets, step=3), (outputs,))


@pytest.mark.parametrize("name", LOSSES)
def test_second_derivative_matches_finite_differences(name):
    outputs, targets = random_batch(4, 3, seed=8)
    outputs.requires_grad_(True)
    loss = make_loss(name, 3, amplitude=30.0, period=8)
    assert torch.autograd.gradgradcheck(lambda x: loss(x, targets, step=5), (outputs,))


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(LOSSES),
    num_classes=st.integers(2, 5),
    num_samples=st.integers(1, 6),
    step=st.integers(0, 10_000),
    amplitude=st.floats(1.0, 100.0),
    period=st.integers(1, 200),
    schedule=schedules,
    seed=st.integers(0, 1000),
)
def test_gradient_property_finite_differences(
    name, num_classes, num_samples, step, amplitude, period, schedule, seed
):
    outputs, targets = random_batch(num_samples, num_classes, seed)
    outputs.requires_grad_(True)
    loss = make_loss(
        name, num_classes, amplitude, period, resolve(schedule), class_order="random", seed=seed
    )
    assert torch.autograd.gradcheck(lambda x: loss(x, targets, step=step), (outputs,))


def test_float32_outputs_keep_dtype():
    outputs, targets = random_batch(4, 3, seed=9)
    value = make_loss("dmse2", 3, amplitude=10.0, period=4)(outputs.float(), targets, step=1)
    assert value.dtype == torch.float32


def test_invalid_shapes_raise():
    outputs, targets = random_batch(4, 3, seed=10)
    with pytest.raises(ValueError, match="targets shape"):
        weighted_loss("ce", outputs, targets[:3], torch.ones(3))
    with pytest.raises(ValueError, match="gamma shape"):
        weighted_loss("dce", outputs, targets, torch.ones(2))
    with pytest.raises(ValueError, match="outputs shape"):
        weighted_loss("mse", outputs[0], targets, torch.ones(3))
