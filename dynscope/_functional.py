"""Evaluate a model's loss and outputs as pure functions of one flat parameter vector.

These are the generic torch.func paths of `dynscope.curvature`, valid for any module that is a
pure function of its parameters and buffers, and for any differentiable loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dynscope import losses

LossFunction = Callable[..., Tensor]
"""A `dynscope.losses.ClassificationLoss` or any callable ``(outputs, targets) -> scalar``."""


def flat_loss(
    model: nn.Module,
    loss_fn: LossFunction,
    inputs: Tensor,
    targets: Tensor,
    step: int,
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """Return the loss as a function of the flat parameter vector, and the current vector."""
    named = dict(model.named_parameters())
    if not named:
        raise ValueError("model has no parameters: the Hessian needs at least one parameter")
    names = list(named)
    shapes = [named[name].shape for name in names]
    sizes = [named[name].numel() for name in names]
    flat = torch.cat([named[name].detach().reshape(-1) for name in names])
    buffers = dict(model.named_buffers())
    inputs = inputs.to(dtype=flat.dtype, device=flat.device)
    targets = targets.to(device=flat.device)
    evaluate = loss_caller(loss_fn, step)

    def loss_of_flat(vector: Tensor) -> Tensor:
        pieces = torch.split(vector, sizes)
        parameters: dict[str, Any] = {
            name: piece.view(shape)
            for name, piece, shape in zip(names, pieces, shapes, strict=True)
        }
        parameters.update(buffers)
        outputs = torch.func.functional_call(model, parameters, (inputs,))
        return evaluate(outputs, targets)

    return loss_of_flat, flat


def loss_caller(loss_fn: LossFunction, step: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Bind the step of a dynscope loss, so every loss reads ``(outputs, targets) -> scalar``."""
    if isinstance(loss_fn, losses.ClassificationLoss):
        return lambda outputs, targets: loss_fn(outputs, targets, step=step)
    return loss_fn


def output_jacobian(model: nn.Module, inputs: Tensor) -> Tensor:
    """Return the Jacobian (N C, P) of the flattened outputs with respect to the parameters."""
    named = {name: value.detach() for name, value in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def outputs_of(parameters: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, {**parameters, **buffers}, (inputs,)).reshape(-1)

    pieces = torch.func.jacrev(outputs_of)(named)
    return torch.cat([pieces[name].reshape(pieces[name].shape[0], -1) for name in named], dim=1)
