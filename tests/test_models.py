"""Tests of the MLP builder, parameter helpers and the functional-model check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dynscope.models import (
    ACTIVATIONS,
    assign_parameters,
    build_mlp,
    check_functional,
    count_parameters,
    flatten_parameters,
)


def expected_count(in_features: int, out_features: int, width: int, depth: int) -> int:
    if depth == 0:
        return in_features * out_features + out_features
    first = in_features * width + width
    middle = (depth - 1) * (width * width + width)
    last = width * out_features + out_features
    return first + middle + last


@pytest.mark.parametrize(("width", "depth"), [(7, 0), (7, 1), (5, 3), (100, 1), (16, 4)])
def test_parameter_count_formula(width, depth):
    model = build_mlp(3, 4, width=width, depth=depth)
    assert count_parameters(model) == expected_count(3, 4, width, depth)
    assert len(model.linears) == depth + 1


def test_depth_zero_is_linear():
    model = build_mlp(2, 3, depth=0, init="standard", seed=1)
    inputs = torch.randn(10, 2, dtype=torch.float64)
    linear = model.linears[0]
    expected = inputs @ linear.weight.T + linear.bias
    assert torch.allclose(model(inputs), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_matches_manual_layers(activation):
    model = build_mlp(2, 3, width=6, depth=2, activation=activation, seed=4)
    inputs = torch.randn(8, 2, dtype=torch.float64)
    function = ACTIVATIONS[activation]
    hidden = function(model.linears[0](inputs))
    hidden = function(model.linears[1](hidden))
    expected = model.linears[2](hidden)
    assert torch.equal(model(inputs), expected)
    assert model.activation == activation


@pytest.mark.parametrize("init", ["torch", "standard", "glorot"])
def test_same_seed_same_parameters(init):
    torch.manual_seed(123)
    first = flatten_parameters(build_mlp(2, 3, width=10, depth=2, init=init, seed=5))
    torch.manual_seed(999)
    torch.rand(17)
    second = flatten_parameters(build_mlp(2, 3, width=10, depth=2, init=init, seed=5))
    other = flatten_parameters(build_mlp(2, 3, width=10, depth=2, init=init, seed=6))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_build_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_mlp(2, 3, width=50, depth=2)
    assert torch.equal(torch.rand(3), expected)


def test_torch_init_matches_nn_linear():
    # nn.Linear draws from the global generator in the same order: weight then bias per layer.
    torch.manual_seed(3)
    reference = [nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 3)]
    expected = torch.cat(
        [p.detach().reshape(-1) for layer in reference for p in layer.parameters()]
    )
    model = build_mlp(2, 3, width=8, depth=2, init="torch", seed=3, dtype=torch.float32)
    assert torch.allclose(flatten_parameters(model), expected, rtol=1e-6, atol=1e-7)


def test_standard_init_statistics():
    model = build_mlp(400, 10, width=300, depth=1, init="standard", seed=0)
    for linear in model.linears:
        fan_in = linear.in_features
        std = linear.weight.std().item()
        assert std == pytest.approx(1 / math.sqrt(fan_in), rel=0.03)
        assert abs(linear.weight.mean().item()) < 4 / math.sqrt(fan_in * linear.weight.numel())
        assert torch.count_nonzero(linear.bias).item() == 0


def test_glorot_init_bounds_and_variance():
    model = build_mlp(200, 50, width=300, depth=1, init="glorot", seed=0)
    for linear in model.linears:
        bound = math.sqrt(6 / (linear.in_features + linear.out_features))
        assert linear.weight.abs().max().item() <= bound
        assert linear.weight.var().item() == pytest.approx(bound**2 / 3, rel=0.03)
        assert torch.count_nonzero(linear.bias).item() == 0


def test_torch_init_bounds():
    model = build_mlp(50, 10, width=200, depth=1, init="torch", seed=0)
    for linear in model.linears:
        bound = 1 / math.sqrt(linear.in_features)
        assert linear.weight.abs().max().item() <= bound
        assert linear.bias.abs().max().item() <= bound
        assert linear.weight.var().item() == pytest.approx(bound**2 / 3, rel=0.05)


def test_dtype_option():
    double = build_mlp(2, 3, width=5, seed=2)
    single = build_mlp(2, 3, width=5, seed=2, dtype=torch.float32)
    assert flatten_parameters(double).dtype == torch.float64
    assert flatten_parameters(single).dtype == torch.float32
    assert torch.equal(flatten_parameters(single).double(), flatten_parameters(double))


def test_flatten_order_and_copy():
    model = build_mlp(2, 3, width=4, depth=1, seed=0)
    flat = flatten_parameters(model)
    manual = torch.cat([p.reshape(-1) for p in model.parameters()])
    assert torch.equal(flat, manual)
    flat += 1.0
    assert not torch.equal(flatten_parameters(model), flat)


def test_assign_round_trip():
    model = build_mlp(2, 3, width=4, depth=2, seed=0)
    target = torch.arange(count_parameters(model), dtype=torch.float64)
    assign_parameters(model, target)
    assert torch.equal(flatten_parameters(model), target)
    assert torch.equal(model.linears[0].bias, target[8:12])


def test_assign_wrong_length_raises():
    model = build_mlp(2, 3, width=4, depth=1, seed=0)
    with pytest.raises(ValueError, match="has 27 parameters"):
        assign_parameters(model, torch.zeros(26, dtype=torch.float64))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"activation": "sigmoid"}, "activation"),
        ({"init": "orthogonal"}, "init"),
        ({"depth": -1}, "depth"),
        ({"width": 0}, "width"),
        ({"dtype": torch.float16}, "dtype"),
    ],
)
def test_build_invalid_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        build_mlp(2, 3, **options)


def test_check_functional_accepts_mlp():
    model = build_mlp(2, 3, width=4, depth=2)
    check_functional(model, torch.zeros(1, 2, dtype=torch.float64))


def test_check_functional_names_batchnorm():
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="layer 1 \\(BatchNorm1d\\)"):
        check_functional(model)
    model.eval()
    check_functional(model, torch.zeros(5, 2))


def test_check_functional_names_dropout():
    model = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.5))
    with pytest.raises(ValueError, match="layer 1 \\(Dropout\\)"):
        check_functional(model)


class CountingLayer(nn.Module):
    """Layer that counts its calls in a buffer, to test the forward-pass check."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return inputs


def test_check_functional_detects_buffer_change():
    model = nn.Sequential(nn.Linear(2, 2), CountingLayer())
    check_functional(model)
    with pytest.raises(ValueError, match="buffer 1.calls"):
        check_functional(model, torch.zeros(3, 2))
    assert model[1].calls.item() == 0
