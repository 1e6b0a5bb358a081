"""Assemble the exact Hessian, its diagonal and the NTK Gram matrix of a `dynscope.models.MLP`.

Notation for one sample: layer l maps ``a_l`` to ``z_l = W_l a_l + b_l``, and ``a_{l+1} =
sigma(z_l)`` for hidden layers; ``a_0`` is the input and ``z_L`` the output. With ``e_l`` the
gradient of the loss with respect to ``z_l`` and ``Q_l`` its Hessian with respect to ``z_l``
(computed backwards from the closed-form output Hessian ``Q_L``):

    Q_l = diag(s'_l) W_{l+1}^T Q_{l+1} W_{l+1} diag(s'_l) + diag(s''_l * W_{l+1}^T e_{l+1})

with s' and s'' the activation's first and second derivatives at z_l.

The Hessian block between parameter (i, j) of layer l (input j of unit i, j = bias for the
constant input 1) and parameter (i', j') of layer m <= l is, summed over samples,

    u_l[j] (Q_l dz_l/dz_m)[i, i'] u_m[j']  +  e_l[i] (da_l/dz_m)[j, i'] u_m[j']

where ``u`` is the layer input extended by 1. The first term contains the Gauss-Newton part
``J^T H_out J`` and the activation's second derivative. The second term is the cross term between
layers, which remains for ReLU and is zero for m = l and for the biases of layer l. Every block is
formed by matrix products whose total cost is about N P^2 multiply-adds.

NOTE: memory grows as N * width^2 for ``Q_l`` on top of the P^2 Hessian, so very wide layers on
many samples are better served by the torch.func path or by Lanczos on Hessian-vector products.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynscope import losses, models

# torch.nn.functional.softplus (beta 1) returns its input above this threshold, so its derivative
# there is exactly 1.
_SOFTPLUS_THRESHOLD = 20.0


@dataclass(frozen=True)
class _Pass:
    """Forward and backward quantities of one MLP on one batch."""

    inputs: list[Tensor]  # a_l, the input of layer l, (N, d_l)
    first: list[Tensor]  # sigma'(z_l) of hidden layer l, (N, out_l)
    gradients: list[Tensor]  # e_l, (N, out_l)
    hessians: list[Tensor]  # Q_l, (N, out_l, out_l)


def mlp_linears(model: nn.Module) -> list[nn.Linear] | None:
    """Return the layers of a `dynscope.models.MLP` whose parameters are exactly its linears."""
    if not isinstance(model, models.MLP):
        return None
    linears: list[nn.Linear] = []
    expected: list[Tensor] = []
    for linear in model.linears:
        if not isinstance(linear, nn.Linear) or linear.bias is None:
            return None
        linears.append(linear)
        expected.extend([linear.weight, linear.bias])
    parameters = list(model.parameters())
    if len(parameters) != len(expected):
        return None
    if any(a is not b for a, b in zip(parameters, expected, strict=True)):
        return None
    return linears


def is_closed_form_loss(loss_fn: object) -> bool:
    """Return whether the loss is a dynscope loss evaluated by `dynscope.losses.weighted_loss`."""
    if not isinstance(loss_fn, losses.ClassificationLoss):
        return False
    return (
        loss_fn.name in losses.LOSSES and type(loss_fn).forward is losses.ClassificationLoss.forward
    )


def output_derivatives(
    loss_fn: losses.ClassificationLoss, outputs: Tensor, targets: Tensor, step: int
) -> tuple[Tensor, Tensor]:
    """Return the gradient (N, C) and the per-sample Hessian (N, C, C) of the loss in the outputs.

    Closed forms of `dynscope.losses.weighted_loss`, with the 1/N of the mean included.
    """
    count, classes = outputs.shape
    weights = torch.as_tensor(
        loss_fn.gamma_at(step, classes), dtype=outputs.dtype, device=outputs.device
    )
    one_hot = nn.functional.one_hot(targets, classes).to(outputs.dtype)
    name = loss_fn.name

    if name in ("ce", "dce"):
        sample_weight = weights[targets] if name == "dce" else torch.ones_like(outputs[:, 0])
        probabilities = torch.softmax(outputs, dim=1)
        gradient = sample_weight[:, None] * (probabilities - one_hot) / count
        curvature = (
            torch.diag_embed(probabilities) - probabilities[:, :, None] * probabilities[:, None, :]
        )
        return gradient, sample_weight[:, None, None] * curvature / count

    if name == "dmse2":
        gradient = 2.0 * weights * (outputs - one_hot) / count
        curvature = torch.diag(2.0 * weights / count).expand(count, classes, classes)
        return gradient, curvature

    sample_weight = weights[targets] if name == "dmse1" else torch.ones_like(outputs[:, 0])
    gradient = 2.0 * sample_weight[:, None] * (outputs - one_hot) / count
    identity = torch.eye(classes, dtype=outputs.dtype, device=outputs.device)
    curvature = 2.0 * sample_weight[:, None, None] * identity / count
    return gradient, curvature


def activation_derivatives(activation: str, pre: Tensor) -> tuple[Tensor, Tensor | None]:
    """Return sigma'(z) and sigma''(z) (None if identically zero), matching torch's autograd."""
    if activation == "relu":
        return (pre > 0).to(pre.dtype), None
    if activation == "tanh":
        value = torch.tanh(pre)
        first = 1.0 - value * value
        return first, -2.0 * value * first
    if activation == "softplus":
        sigmoid = torch.sigmoid(pre)
        linear = pre > _SOFTPLUS_THRESHOLD
        first = torch.where(linear, torch.ones_like(pre), sigmoid)
        second = torch.where(linear, torch.zeros_like(pre), sigmoid * (1.0 - sigmoid))
        return first, second
    if activation == "gelu":
        density = torch.exp(-0.5 * pre * pre) / math.sqrt(2.0 * math.pi)
        cumulative = 0.5 * (1.0 + torch.erf(pre / math.sqrt(2.0)))
        return cumulative + pre * density, density * (2.0 - pre * pre)
    raise ValueError(f"invalid activation {activation!r}: use one of relu, tanh, gelu, softplus")


def _forward(
    linears: list[nn.Linear], activation: str, inputs: Tensor
) -> tuple[list[Tensor], list[Tensor], list[Tensor | None], Tensor]:
    """Return each layer's input a_l, each hidden layer's sigma' and sigma'', and the outputs."""
    layer_inputs = [inputs]
    first: list[Tensor] = []
    second: list[Tensor | None] = []
    hidden = inputs
    for linear in linears[:-1]:
        pre = hidden @ linear.weight.T + linear.bias
        derivative, curvature = activation_derivatives(activation, pre)
        first.append(derivative)
        second.append(curvature)
        hidden = models.ACTIVATIONS[activation](pre)
        layer_inputs.append(hidden)
    return layer_inputs, first, second, hidden @ linears[-1].weight.T + linears[-1].bias


def forward_backward(
    linears: list[nn.Linear],
    activation: str,
    loss_fn: losses.ClassificationLoss,
    inputs: Tensor,
    targets: Tensor,
    step: int,
) -> _Pass:
    """Run the forward pass, then back-propagate the gradient e_l and the Hessian Q_l."""
    layer_inputs, first, second, outputs = _forward(linears, activation, inputs)
    gradient, curvature_out = output_derivatives(loss_fn, outputs, targets, step)
    gradients = [gradient]
    hessians = [curvature_out]
    for layer in range(len(linears) - 2, -1, -1):
        weight = linears[layer + 1].weight
        back = gradients[0] @ weight
        # dz_{l+1}/dz_l transposed, (N, out_l, out_{l+1}); two batched products form Q_l directly
        pullback = first[layer][:, :, None] * weight.T
        hessian = pullback @ hessians[0] @ pullback.transpose(1, 2)
        curvature = second[layer]
        if curvature is not None:
            torch.diagonal(hessian, dim1=1, dim2=2).add_(curvature * back)
        gradients.insert(0, first[layer] * back)
        hessians.insert(0, hessian)
    return _Pass(layer_inputs, first, gradients, hessians)


def mlp_hessian(
    linears: list[nn.Linear],
    activation: str,
    loss_fn: losses.ClassificationLoss,
    inputs: Tensor,
    targets: Tensor,
    step: int,
) -> Tensor:
    """Assemble the exact (P, P) Hessian block by block, in ``model.parameters()`` order."""
    with torch.no_grad():
        state = forward_backward(linears, activation, loss_fn, inputs, targets, step)
        sizes = [linear.weight.numel() + linear.bias.numel() for linear in linears]
        offsets = [sum(sizes[:layer]) for layer in range(len(sizes))]
        total = sum(sizes)
        result = torch.zeros(total, total, dtype=inputs.dtype, device=inputs.device)
        # Elements per chunk of temporaries: an eighth of the Hessian, or one N x P_m product.
        budget = max(total * total // 8, inputs.shape[0] * max(sizes))

        for row in range(len(linears)):
            rows = slice(offsets[row], offsets[row] + sizes[row])
            # Walk the columns from this layer back to the input, carrying Q_row dz_row/dz_column
            # ("mixed") and da_row/dz_column: diagonal for the previous layer, dense before it.
            mixed = state.hessians[row]
            diagonal_jacobian: Tensor | None = None
            dense_jacobian: Tensor | None = None
            for column in range(row, -1, -1):
                if column < row:
                    weight = linears[column + 1].weight
                    slope = state.first[column][:, None, :]
                    mixed = (mixed @ weight) * slope
                    if diagonal_jacobian is None:
                        diagonal_jacobian = state.first[column]
                    elif dense_jacobian is None:
                        dense_jacobian = diagonal_jacobian[:, :, None] * weight * slope
                    else:
                        dense_jacobian = (dense_jacobian @ weight) * slope
                columns = slice(offsets[column], offsets[column] + sizes[column])
                block = result[rows, columns]
                row_input = state.inputs[row]
                column_input = state.inputs[column]
                _add_curvature_term(block, row_input, column_input, mixed, budget)
                if dense_jacobian is not None:
                    gradient = state.gradients[row]
                    _add_cross_term(block, gradient, column_input, dense_jacobian, budget)
                elif diagonal_jacobian is not None:
                    gradient = state.gradients[row]
                    _add_adjacent_cross_term(block, gradient, column_input, diagonal_jacobian)
                if column < row:
                    result[columns, rows] = block.T
        return result


def _extend(layer_input: Tensor) -> Tensor:
    """Append the constant input 1 that multiplies the biases."""
    ones = torch.ones(layer_input.shape[0], 1, dtype=layer_input.dtype, device=layer_input.device)
    return torch.cat([layer_input, ones], dim=1)


def _add_curvature_term(
    block: Tensor, row_input: Tensor, column_input: Tensor, mixed: Tensor, budget: int
) -> None:
    """Add sum_n u_l[j] mixed[n, i, i'] u_m[j'] to the (P_l, P_m) block.

    Both groupings cost N P_l P_m multiply-adds; the one with the smaller temporary is used.
    """
    units_row, units_column = mixed.shape[1:]
    if row_input.shape[1] + 1 <= units_row * units_column:
        _add_curvature_by_input_pairs(block, row_input, column_input, mixed, budget)
    else:
        _add_curvature_by_units(block, row_input, column_input, mixed, budget)


def _add_curvature_by_units(
    block: Tensor, row_input: Tensor, column_input: Tensor, mixed: Tensor, budget: int
) -> None:
    """Form the block one chunk of row units i at a time: u_l^T times mixed[n, i, i'] u_m[j']."""
    count, width_row = row_input.shape
    units_row, units_column = mixed.shape[1:]
    row_extended = _extend(row_input)
    weight_rows = block[: units_row * width_row].view(units_row, width_row, -1)
    bias_rows = block[units_row * width_row :]
    chunk = max(1, budget // (2 * count * block.shape[1]))
    for start in range(0, units_row, chunk):
        stop = min(start + chunk, units_row)
        scaled = mixed[:, start:stop, :].transpose(0, 1)  # (size, N, out_m)
        outer = (scaled[..., :, None] * column_input[:, None, :]).flatten(start_dim=2)
        features = torch.cat([outer, scaled], dim=2)  # (size, N, P_m) in parameter order
        products = row_extended.T @ features  # (size, d_l + 1, P_m)
        weight_rows[start:stop] += products[:, :width_row, :]
        bias_rows[start:stop] += products[:, width_row, :]


def _add_curvature_by_input_pairs(
    block: Tensor, row_input: Tensor, column_input: Tensor, mixed: Tensor, budget: int
) -> None:
    """Form the block one chunk of row inputs j at a time.

    The pair weights u_l[j] u_m[j'] (one row per pair) times ``mixed`` flattened over (i, i').
    """
    count, width_row = row_input.shape
    width_column = column_input.shape[1]
    units_row, units_column = mixed.shape[1:]
    weight_columns = units_column * width_column
    row_extended = _extend(row_input)
    column_extended = _extend(column_input)
    flat_mixed = mixed.reshape(count, units_row * units_column)
    weight_rows = block[: units_row * width_row].view(units_row, width_row, -1)
    bias_rows = block[units_row * width_row :]

    per_input = (width_column + 1) * (count + 2 * units_row * units_column)
    chunk = max(1, budget // per_input)
    for start in range(0, width_row + 1, chunk):
        stop = min(start + chunk, width_row + 1)
        size = stop - start
        pairs = row_extended[:, start:stop, None] * column_extended[:, None, :]
        products = pairs.reshape(count, -1).T @ flat_mixed
        # (size, j', i, i') -> (i, size, i', j'), the parameter order of rows and columns
        products = products.view(size, width_column + 1, units_row, units_column)
        products = products.permute(2, 0, 3, 1)
        weight_part = products[..., :width_column].reshape(units_row, size, weight_columns)
        bias_part = products[..., width_column]

        weight_stop = min(stop, width_row)
        if start < weight_stop:
            kept = weight_stop - start
            weight_rows[:, start:weight_stop, :weight_columns] += weight_part[:, :kept]
            weight_rows[:, start:weight_stop, weight_columns:] += bias_part[:, :kept]
        if stop == width_row + 1:
            bias_rows[:, :weight_columns] += weight_part[:, -1]
            bias_rows[:, weight_columns:] += bias_part[:, -1]


def _add_cross_term(
    block: Tensor, gradient: Tensor, column_input: Tensor, jacobian: Tensor, budget: int
) -> None:
    """Add sum_n e_l[i] jacobian[n, j, i'] u_m[j'] to the weight rows of the block."""
    count, units_row = gradient.shape
    width_row, units_column = jacobian.shape[1:]
    width_column = column_input.shape[1]
    weight_columns = units_column * width_column
    column_extended = _extend(column_input)
    flat_jacobian = jacobian.reshape(count, width_row * units_column)
    weight_rows = block[: units_row * width_row].view(units_row, width_row, -1)

    per_unit = (width_column + 1) * (count + 2 * width_row * units_column)
    chunk = max(1, budget // per_unit)
    for start in range(0, units_row, chunk):
        stop = min(start + chunk, units_row)
        size = stop - start
        pairs = gradient[:, start:stop, None] * column_extended[:, None, :]
        products = pairs.reshape(count, -1).T @ flat_jacobian
        # (i, j', j, i') -> (i, j, i', j')
        products = products.view(size, width_column + 1, width_row, units_column)
        products = products.permute(0, 2, 3, 1)
        weight_part = products[..., :width_column].reshape(size, width_row, weight_columns)
        weight_rows[start:stop, :, :weight_columns] += weight_part
        weight_rows[start:stop, :, weight_columns:] += products[..., width_column]


def _add_adjacent_cross_term(
    block: Tensor, gradient: Tensor, column_input: Tensor, slope: Tensor
) -> None:
    """Add the cross term for the previous layer, where da_l/dz_m = diag(sigma'(z_m)).

    Only columns i' = j are non-zero: sum_n e_l[i] sigma'_m[j] u_m[j'].
    """
    count, units_row = gradient.shape
    width_row = slope.shape[1]
    width_column = column_input.shape[1]
    weight_columns = width_row * width_column
    column_extended = _extend(column_input)
    weighted = slope[:, :, None] * column_extended[:, None, :]
    coefficients = (gradient.T @ weighted.reshape(count, -1)).view(
        units_row, width_row, width_column + 1
    )
    weight_rows = block[: units_row * width_row].view(units_row, width_row, -1)
    weight_block = weight_rows[:, :, :weight_columns].view(
        units_row, width_row, width_row, width_column
    )
    # diagonal over (j, i') gives (i, j', j)
    torch.diagonal(weight_block, dim1=1, dim2=2).add_(
        coefficients[..., :width_column].permute(0, 2, 1)
    )
    torch.diagonal(weight_rows[:, :, weight_columns:], dim1=1, dim2=2).add_(
        coefficients[..., width_column]
    )


def mlp_hessian_diagonal(
    linears: list[nn.Linear],
    activation: str,
    loss_fn: losses.ClassificationLoss,
    inputs: Tensor,
    targets: Tensor,
    step: int,
) -> Tensor:
    """Return the exact diagonal of the Hessian (P,) from the same-layer blocks."""
    with torch.no_grad():
        state = forward_backward(linears, activation, loss_fn, inputs, targets, step)
        pieces = []
        for layer_input, hessian in zip(state.inputs, state.hessians, strict=True):
            unit_curvature = torch.diagonal(hessian, dim1=1, dim2=2)  # (N, out_l)
            pieces.append((unit_curvature.T @ (layer_input * layer_input)).reshape(-1))
            pieces.append(unit_curvature.sum(dim=0))
        return torch.cat(pieces)


def mlp_ntk(linears: list[nn.Linear], activation: str, inputs: Tensor) -> Tensor:
    """Return the empirical NTK Gram matrix (N C, N C), rows ordered (sample, output)."""
    with torch.no_grad():
        layer_inputs, first, _, _ = _forward(linears, activation, inputs)
        count = inputs.shape[0]
        classes = linears[-1].out_features
        # d f / d z_l per sample, (N, C, out_l), from the output layer backwards
        identity = torch.eye(classes, dtype=inputs.dtype, device=inputs.device)
        sensitivity = identity.expand(count, classes, classes)
        gram = torch.zeros(
            count * classes, count * classes, dtype=inputs.dtype, device=inputs.device
        )
        for layer in range(len(linears) - 1, -1, -1):
            input_gram = layer_inputs[layer] @ layer_inputs[layer].T + 1.0  # (N, N)
            flat = sensitivity.reshape(count * classes, -1)
            unit_gram = (flat @ flat.T).view(count, classes, count, classes)
            gram += (unit_gram * input_gram[:, None, :, None]).view_as(gram)
            if layer > 0:
                sensitivity = (sensitivity @ linears[layer].weight) * first[layer - 1][:, None, :]
        return gram


def mlp_hessian_vector_product(
    linears: list[nn.Linear],
    activation: str,
    loss_fn: losses.ClassificationLoss,
    inputs: Tensor,
    targets: Tensor,
    step: int,
) -> Callable[[Tensor], Tensor]:
    """Build v -> H v by the R-operator: one forward and one backward pass of directional terms.

    The forward quantities (a_l, sigma', sigma'', e_l and the output Hessian Q_L) are computed
    once. Each product then pushes the direction V = (V_l, c_l) forward as
    ``R z_l = a_l V_l^T + c_l + (R a_l) W_l^T`` with ``R a_{l+1} = sigma'_l * R z_l``, and back as
    ``R e_L = Q_L R z_L`` and

        R e_{l-1} = sigma'_{l-1} * (R e_l W_l + e_l V_l) + sigma''_{l-1} * R z_{l-1} * (e_l W_l),

    giving ``H v`` for layer l as ``(R e_l^T a_l + e_l^T R a_l, sum_n R e_l)``: about six N x in x
    out matrix products per layer and no autograd graph.
    """
    with torch.no_grad():
        layer_inputs, first, second, outputs = _forward(linears, activation, inputs)
        gradient, output_hessian = output_derivatives(loss_fn, outputs, targets, step)
        gradients = [gradient]
        # sigma''_{l-1} * (e_l W_l), the activation's curvature term, None where sigma'' is zero
        curvature_backs: list[Tensor | None] = []
        for layer in range(len(linears) - 1, 0, -1):
            back = gradients[0] @ linears[layer].weight
            curvature = second[layer - 1]
            curvature_backs.insert(0, None if curvature is None else curvature * back)
            gradients.insert(0, first[layer - 1] * back)
        weights = [linear.weight.detach().clone() for linear in linears]
        shapes = [(weight.shape, weight.numel(), weight.shape[0]) for weight in weights]
        size = sum(count + units for _, count, units in shapes)

    def product(vector: Tensor) -> Tensor:
        # In-place and out= operations keep fresh (N, width) allocations few: each one page-faults.
        with torch.no_grad():
            result = torch.empty(size, dtype=vector.dtype, device=vector.device)
            directions = []
            blocks = []
            offset = 0
            for shape, count, units in shapes:
                weight_direction = vector[offset : offset + count].reshape(shape)
                bias_direction = vector[offset + count : offset + count + units]
                directions.append((weight_direction, bias_direction))
                blocks.append(
                    (
                        result[offset : offset + count].view(shape),
                        result[offset + count : offset + count + units],
                    )
                )
                offset += count + units

            # forward: R z_l for every layer, R a_l for the hidden inputs
            input_directions: list[Tensor | None] = [None]
            pre_directions: list[Tensor | None] = []
            last = len(directions) - 1
            for layer, (weight_direction, bias_direction) in enumerate(directions):
                pre_direction = torch.addmm(bias_direction, layer_inputs[layer], weight_direction.T)
                input_direction = input_directions[layer]
                if input_direction is not None:
                    pre_direction.addmm_(input_direction, weights[layer].T)
                if layer == last:
                    pre_directions.append(pre_direction)
                elif layer < last and curvature_backs[layer] is None:
                    pre_directions.append(None)  # not needed later: scale it in place
                    input_directions.append(pre_direction.mul_(first[layer]))
                else:
                    pre_directions.append(pre_direction)
                    input_directions.append(first[layer] * pre_direction)

            # backward: R e_l from the output down, the product's blocks on the way
            output_direction = pre_directions[-1]
            assert output_direction is not None
            error_direction = torch.bmm(output_hessian, output_direction[:, :, None])[:, :, 0]
            for layer in range(last, -1, -1):
                weight_block, bias_block = blocks[layer]
                torch.mm(error_direction.T, layer_inputs[layer], out=weight_block)
                input_direction = input_directions[layer]
                if input_direction is not None:
                    weight_block.addmm_(gradients[layer].T, input_direction)
                torch.sum(error_direction, dim=0, out=bias_block)
                if layer == 0:
                    break
                back_direction = torch.mm(error_direction, weights[layer])
                back_direction.addmm_(gradients[layer], directions[layer][0])
                error_direction = back_direction.mul_(first[layer - 1])
                curvature_back = curvature_backs[layer - 1]
                if curvature_back is not None:
                    hidden_direction = pre_directions[layer - 1]
                    assert hidden_direction is not None
                    error_direction.addcmul_(curvature_back, hidden_direction)
            return result

    return product
