"""Build the multilayer perceptrons that dynscope trains, and move their parameters as one vector.

The MLP is ``depth`` hidden layers of ``width`` units with one activation, then a linear output
layer. Depth 0 gives a linear model. Initialisation draws from a `torch.Generator` seeded with
``seed`` and never touches the global random state, so the same seed gives the same network
whatever else the process has drawn. Curvature code treats the model as a pure function of one
flat parameter vector, which `check_functional` guards: layers that update buffers or draw random
numbers in ``forward`` break that assumption.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": functional.relu,
    "tanh": torch.tanh,
    "gelu": functional.gelu,
    "softplus": functional.softplus,
}
INITS = ("torch", "standard", "glorot")


class MLP(nn.Module):
    """Fully connected network: ``depth`` hidden layers with an activation, then a linear output.

    Attributes
    ----------
    activation
        Name of the activation of the hidden layers (a key of `ACTIVATIONS`).
    linears
        The ``nn.Linear`` layers: the hidden layers in order, then the output layer.
    """

    def __init__(self, linears: list[nn.Linear], activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"invalid activation {activation!r}: use one of {', '.join(ACTIVATIONS)}"
            )
        self.activation = activation
        self.linears = nn.ModuleList(linears)

    def forward(self, inputs: Tensor) -> Tensor:
        """Map inputs (N, in_features) to outputs (N, out_features)."""
        activation = ACTIVATIONS[self.activation]
        hidden = inputs
        for linear in self.linears[:-1]:
            hidden = activation(linear(hidden))
        return self.linears[-1](hidden)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def build_mlp(
    in_features: int,
    out_features: int,
    width: int = 100,
    depth: int = 1,
    activation: str = "relu",
    init: str = "torch",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> MLP:
    """Build and initialise an MLP on the CPU.

    Parameters
    ----------
    in_features, out_features
        Input and output sizes.
    width
        Units per hidden layer (unused when ``depth`` is 0).
    depth
        Number of hidden layers; 0 gives a linear model.
    activation
        ``relu``, ``tanh``, ``gelu`` or ``softplus``.
    init
        ``torch``: PyTorch's default ``nn.Linear`` initialisation, weights and biases uniform in
        ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``; ``standard``: weights N(0, 1/fan_in), zero biases;
        ``glorot``: Xavier uniform weights, zero biases.
    seed
        Seed of the `torch.Generator` that draws the initial parameters.
    dtype
        ``torch.float64`` (default) or ``torch.float32``. Values are drawn in float32 and then
        converted, so both dtypes start from the same point up to float32 rounding.

    Returns
    -------
    MLP
        The network, in training mode, with parameters in ``dtype``.
    """
    for name, value, minimum in (
        ("in_features", in_features, 1),
        ("out_features", out_features, 1),
        ("width", width, 1),
        ("depth", depth, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"invalid {name} {value!r}: use an integer >= {minimum}")
    if init not in INITS:
        raise ValueError(f"invalid init {init!r}: use one of {', '.join(INITS)}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"invalid dtype {dtype}: use torch.float64 or torch.float32")

    sizes = [in_features] + [width] * depth + [out_features]
    generator = torch.Generator().manual_seed(seed)
    linears = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        # skip_init builds the layer without drawing from the global generator.
        linear = nn.utils.skip_init(nn.Linear, fan_in, fan_out, dtype=torch.float32)
        _initialise(linear, init, generator)
        linears.append(linear.to(dtype))
    return MLP(linears, activation)


def _initialise(linear: nn.Linear, init: str, generator: torch.Generator) -> None:
    fan_in, fan_out = linear.in_features, linear.out_features
    with torch.no_grad():
        if init == "torch":
            # Same as nn.Linear.reset_parameters (torch 2.x): kaiming_uniform_(a=sqrt(5)) gives
            # this bound for the weight, which is drawn before the bias with the same bound.
            bound = 1.0 / math.sqrt(fan_in)
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.uniform_(-bound, bound, generator=generator)
        elif init == "standard":
            linear.weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
            linear.bias.zero_()
        else:
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.zero_()


def count_parameters(model: nn.Module) -> int:
    """Return the number of scalar parameters of a model."""
    return sum(parameter.numel() for parameter in model.parameters())


def flatten_parameters(model: nn.Module) -> Tensor:
    """Return a detached copy of all parameters as one vector, in ``model.parameters()`` order."""
    return torch.cat([parameter.detach().reshape(-1) for parameter in model.parameters()])


def assign_parameters(model: nn.Module, flat: Tensor) -> None:
    """Copy a flat vector into the parameters in place, in ``model.parameters()`` order.

    Raises
    ------
    ValueError
        If ``flat`` is not a vector with one entry per parameter.
    """
    expected = count_parameters(model)
    if flat.ndim != 1 or flat.numel() != expected:
        raise ValueError(
            f"invalid flat parameter shape {tuple(flat.shape)}: the model has {expected} "
            "parameters, so pass a vector of that length"
        )
    offset = 0
    with torch.no_grad():
        for parameter in model.parameters():
            size = parameter.numel()
            parameter.copy_(flat[offset : offset + size].view_as(parameter))
            offset += size


def check_functional(model: nn.Module, example_inputs: Tensor | None = None) -> None:
    """Raise ValueError if the model is not a pure function of its parameters.

    Layers that update buffers in ``forward`` (batch and instance normalisation with running
    statistics, in training mode) or draw random numbers (dropout in training mode) are rejected
    by type. With ``example_inputs``, the check also runs one forward pass and rejects any layer
    whose buffers changed; the buffers are restored afterwards.

    Raises
    ------
    ValueError
        Naming the first offending layer and the fix.
    """
    for name, module in model.named_modules():
        layer = name or type(module).__name__
        is_norm = isinstance(module, nn.modules.batchnorm._NormBase)
        if is_norm and module.training and module.track_running_stats:
            raise ValueError(
                f"layer {layer} ({type(module).__name__}) updates its running statistics in "
                "forward: call model.eval() or build it with track_running_stats=False"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise ValueError(
                f"layer {layer} ({type(module).__name__}) draws random masks in forward: "
                "call model.eval() or remove the dropout"
            )
    if example_inputs is not None:
        _check_buffers_unchanged(model, example_inputs)


def _check_buffers_unchanged(model: nn.Module, example_inputs: Tensor) -> None:
    before = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    with torch.no_grad():
        model(example_inputs)
    changed = [
        name
        for name, buffer in model.named_buffers()
        if name not in before or not torch.equal(buffer, before[name])
    ]
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in before:
                buffer.copy_(before[name])
    if changed:
        layer = changed[0].rpartition(".")[0] or changed[0]
        raise ValueError(
            f"layer {layer} changes its buffer {changed[0]} in forward: call model.eval() or "
            "remove the layer, because curvature needs a pure function of the parameters"
        )
