"""Train runs that differ only by seed together in one process.

An ensemble is K copies of one record config with seeds s_1..s_K. Their parameters are stacked
along a leading member axis, and one step of every member is one batched forward and backward
pass: each layer is a batched matrix product over the members (``torch.bmm``), and the backward
pass starts from the closed-form gradient of the loss in the outputs, so no autograd graph is
built. A network with one hidden ReLU layer and few inputs and classes, like the spiral's, takes
a shorter route: it is linear in its 0/1 activation pattern, so its outputs and gradients come
from two products of that pattern (see `_factored_step_function`). The same step written as
``torch.func.vmap`` over ``torch.func.grad_and_value`` is kept as the reference that the tests
compare against. Each member writes its own record through
`dynscope.store`, with the same rows, probes, snapshots, flushes and attributes as
``dynscope.recorder.record(config.replace(seed=s))``; the records agree to float rounding (the
batched products may sum in another order). Rounding differences grow where training is
unstable: tests hold float64 runs at lr 0.5 to 1e-10, float32 runs differ by about 1e-7, and a
diverging or chaotic run departs from its single run after some steps.

Data and seeds: every member trains on the data set its own seed gives, exactly like a single
run, so that its record and its stored config describe the same run. The K data sets are
stacked along the member axis too (a spiral's points depend on the seed, its size does not).
Sharing one data set across seeds would need a data seed separate from the initialisation seed,
which `RecordConfig` does not have. The loss schedule (a random class order) and the SGD
mini-batches also follow each member's seed.

Curvature probes loop over the members: the parameters of member k are copied into a model and
probed as in a single run, so probes cost as much as in K single runs.

Speed: the gain is the per-step cost of K - 1 runs (Python, dispatch, the loss schedule), so
it shrinks as the arithmetic grows. For the default spiral network (width 100, 300 training and
300 validation points, float64), the activation patterns of 16 members take 7.7 MB, more than
a core's cache, and their products dominate the step. docs/benchmarks.md has the measured
speed-ups over 16 single runs. Small networks gain the most.

Limits: every member must have parameters of the same shape, so only the seed may differ; a
member that diverges stops recording (status "diverged") while the others go on; an ensemble
is not resumed as a whole, but each member's record resumes alone with ``record(resume=True)``.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dynscope import _mlp_hessian, losses, models, recorder, store
from dynscope.config import RecordConfig
from dynscope.recorder import RecordResult

logger = logging.getLogger(__name__)

# Bytes of activation patterns that the factored step computes and reuses at a time, so that
# they are read back from a core's cache. On the development machine (2 MB of L2 cache a core),
# 256 KiB and 1 MiB measured the same, and computing all patterns at once was 8% to 22%
# slower in five interleaved comparisons.
_CACHE_BYTES = 1 << 20

# Columns of the (K, 6) metrics tensor that every step function returns.
_METRICS = ("loss", "static_loss", "train_accuracy", "val_accuracy", "grad_norm", "minibatch_loss")


@dataclass
class _Ensemble:
    """The members' runs and writers, and their parameters stacked along the member axis."""

    config: RecordConfig
    runs: list[recorder._Run]
    writers: list[store.RecordWriter]
    names: list[str]
    params: dict[str, Tensor]
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


def record_ensemble(
    config: RecordConfig,
    seeds: Sequence[int],
    outputs: str | Path | Sequence[str | Path],
    *,
    force: bool = False,
    quiet: bool = False,
) -> list[RecordResult]:
    """Train one run per seed together and write one record per member.

    Parameters
    ----------
    config
        Options shared by the members; its own ``seed`` is replaced by each member's seed.
    seeds
        One seed per member, all different.
    outputs
        A folder, where member s writes ``seed-<s>.nc``, or one record path per seed.
    force
        Overwrite existing records.
    quiet
        Hide the progress bar (it also hides itself when stderr is not a terminal).

    Returns
    -------
    list of RecordResult
        One per member, in the order of ``seeds``; the wall time is the ensemble's.

    Raises
    ------
    ValueError
        For invalid options, seeds or output paths, before any file is created.
    """
    seeds = _check_seeds(seeds)
    _check_open_files(len(seeds))
    paths = _output_paths(outputs, seeds)
    members = [config.replace(seed=seed).validate() for seed in seeds]
    for path in paths:
        recorder._check_output(path, force)

    ensemble = _build_ensemble(members, paths, force)
    with recorder._signal_flag() as stop_signal:
        return _train(ensemble, stop_signal, quiet)


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds given: an ensemble needs at least one seed")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"invalid seed {seed!r}: use integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"repeated seed in {seeds}: give each member its own seed")
    return seeds


# Files each member's writer keeps open (its journal and its lock), and a margin for the rest
# of the process. Measured: 11 open files for 3 members and 85 for 40, so about 5 besides the
# members. The margin leaves room for netCDF and HDF5 while a file is being written.
_FILES_PER_MEMBER = 2
_OTHER_OPEN_FILES = 16


def _check_open_files(count: int) -> None:
    """Raise ValueError when ``count`` members would exceed the limit on open files."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    needed = count * _FILES_PER_MEMBER + _OTHER_OPEN_FILES
    if limit != resource.RLIM_INFINITY and needed > limit:
        raise ValueError(
            f"an ensemble of {count} seeds keeps about {needed} files open, above this "
            f"process's limit of {limit}: raise the limit (ulimit -n) or use fewer seeds"
        )


def _output_paths(outputs: str | Path | Sequence[str | Path], seeds: list[int]) -> list[Path]:
    if isinstance(outputs, (str, Path)):
        folder = Path(outputs)
        if not folder.is_dir():
            raise ValueError(
                f"output folder not found: {folder}; create it or pass one record path per seed"
            )
        return [folder / f"seed-{seed}.nc" for seed in seeds]
    paths = [Path(output) for output in outputs]
    if len(paths) != len(seeds):
        raise ValueError(
            f"{len(paths)} output paths for {len(seeds)} seeds: give one record path per seed"
        )
    if len(set(paths)) != len(paths):
        raise ValueError("repeated output path: give each member its own record path")
    return paths


def _build_ensemble(members: list[RecordConfig], paths: list[Path], force: bool) -> _Ensemble:
    runs = [recorder._build_run(member) for member in members]
    for run in runs:
        recorder._check_sizes(run)  # before any file is created, as in a single run
    template = runs[0].model
    names = [name for name, _ in template.named_parameters()]
    params = {}
    for name in names:
        tensors = [dict(run.model.named_parameters())[name].detach() for run in runs]
        params[name] = torch.stack(tensors)

    writers = []
    try:
        for run, path in zip(runs, paths, strict=True):
            writers.append(recorder._create_writer(run, path, force))
    except BaseException:
        for writer in writers:
            writer.close("interrupted")
        raise

    return _Ensemble(
        config=members[0],
        runs=runs,
        writers=writers,
        names=names,
        params=params,
        x_train=torch.stack([run.x_train for run in runs]),
        y_train=torch.stack([run.y_train for run in runs]),
        x_val=torch.stack([run.x_val for run in runs]),
        y_val=torch.stack([run.y_val for run in runs]),
    )


class _Workspace:
    """Tensors that a step function reuses from step to step, by role and shape.

    glibc serves allocations of a (K, N, width) tensor with mmap and unmaps them when freed, so
    each fresh one costs page faults, measured to dominate small steps.
    """

    def __init__(self) -> None:
        self.tensors: dict[tuple[str, tuple[int, ...]], Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Return the tensor for (role, shape), with the dtype and device of ``like``."""
        tensor = self.tensors.get((role, shape))
        if tensor is None:
            tensor = torch.empty(shape, dtype=like.dtype, device=like.device)
            self.tensors[(role, shape)] = tensor
        return tensor


class _OneHotCache:
    """The one-hot targets of the last targets tensor seen: full-batch steps reuse them."""

    def __init__(self) -> None:
        self.targets: Tensor | None = None
        self.one_hot = torch.empty(0)

    def get(self, targets: Tensor, like: Tensor) -> Tensor:
        """Return `_one_hot` (targets, like), computed again only for another targets tensor."""
        if targets is not self.targets or self.one_hot.dtype != like.dtype:
            self.targets = targets
            self.one_hot = _one_hot(targets, like)
        return self.one_hot


def _member_step_function(ensemble: _Ensemble) -> Callable[..., tuple[dict[str, Tensor], Tensor]]:
    """Return the vmapped step: per-member gradients and the metrics of `_METRICS`, (K, 6)."""
    model = ensemble.runs[0].model
    loss_name = ensemble.runs[0].loss.name
    static_name = ensemble.runs[0].static_loss.name
    full_batch = ensemble.config.optimizer == "gd"

    def member_step(
        params: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        x_val: Tensor,
        y_val: Tensor,
        gamma: Tensor,
        x_batch: Tensor,
        y_batch: Tensor,
    ) -> tuple[dict[str, Tensor], Tensor]:
        def objective(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            batch_outputs = torch.func.functional_call(model, p, (x_batch,))
            value = _weighted_loss(loss_name, batch_outputs, y_batch, gamma)
            return value, batch_outputs

        gradients, (objective_value, batch_outputs) = torch.func.grad_and_value(
            objective, has_aux=True
        )(params)
        if full_batch:
            outputs = batch_outputs
            loss = objective_value
            minibatch_loss = torch.full_like(loss, math.nan)
        else:
            outputs = torch.func.functional_call(model, params, (x,))
            loss = _weighted_loss(loss_name, outputs, y, gamma)
            minibatch_loss = objective_value

        static = _weighted_loss(static_name, outputs, y, gamma)
        train_accuracy = (outputs.argmax(dim=1) == y).double().mean()
        val_outputs = torch.func.functional_call(model, params, (x_val,))
        val_accuracy = (val_outputs.argmax(dim=1) == y_val).double().mean()
        squares = [(gradient.double() ** 2).sum() for gradient in gradients.values()]
        grad_norm = torch.sqrt(torch.stack(squares).sum())
        metrics = [loss, static, train_accuracy, val_accuracy, grad_norm, minibatch_loss]
        return gradients, torch.stack([value.double() for value in metrics])

    return torch.func.vmap(member_step)


def _mlp_step_function(
    ensemble: _Ensemble,
) -> Callable[..., tuple[dict[str, Tensor], Tensor]] | None:
    """Return the step of `_member_step_function` written out for a stack of MLPs, or None.

    The members' layers are batched matrix products (``torch.baddbmm`` and ``torch.bmm`` over
    the member axis), and the backward pass applies the closed-form output gradient of the loss,
    so no autograd graph is built. For the small networks an ensemble is for, this removes most
    of the per-operation cost that vmap over autograd pays.
    """
    model = ensemble.runs[0].model
    linears = _mlp_hessian.mlp_linears(model)
    if linears is None:
        return None
    assert isinstance(model, models.MLP)
    activation = models.ACTIVATIONS[model.activation]
    activation_name = model.activation
    weight_names = ensemble.names[0::2]
    bias_names = ensemble.names[1::2]
    loss_name = ensemble.runs[0].loss.name
    full_batch = ensemble.config.optimizer == "gd"

    workspace = _Workspace()
    one_hots = _OneHotCache()

    extended_inputs: dict[str, tuple[Tensor, Tensor]] = {}

    def with_ones(x: Tensor, role: str) -> Tensor:
        """Return x with a column of ones appended, kept while the same x comes back."""
        cached = extended_inputs.get(role)
        if cached is not None and cached[0] is x:
            return cached[1]
        ones = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)
        extended = torch.cat([x, ones], dim=2)
        extended_inputs[role] = (x, extended)
        return extended

    def forward(
        params: dict[str, Tensor],
        x: Tensor,
        x_extended: Tensor,
        role: str,
        gates: list[Tensor] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Return the outputs (K, N, C) and each layer's input.

        ``gates`` receives each hidden layer's slope, except for ReLU, whose backward pass
        reads the layer's output instead.
        """
        layer_inputs = [x]
        hidden = x
        for layer, (weight_name, bias_name) in enumerate(
            zip(weight_names[:-1], bias_names[:-1], strict=True)
        ):
            weight = params[weight_name]
            bias = params[bias_name]
            shape = (hidden.shape[0], hidden.shape[1], weight.shape[1])
            pre = workspace.get(f"{role} {layer}", shape, hidden)
            if layer == 0:
                # The bias as the weight of a constant input: one pass over the result instead
                # of a broadcast copy of the bias followed by the product.
                extended = torch.cat([weight, bias[:, :, None]], dim=2)
                torch.bmm(x_extended, extended.mT, out=pre)
            else:
                torch.baddbmm(bias[:, None, :], hidden, weight.mT, out=pre)
            if activation_name == "relu":
                hidden = pre.clamp_min_(0)  # its backward gate is read off the output itself
            else:
                if gates is not None:
                    gates.append(_mlp_hessian.activation_derivatives(activation_name, pre)[0])
                hidden = activation(pre)
            layer_inputs.append(hidden)
        bias = params[bias_names[-1]][:, None, :]
        return torch.baddbmm(bias, hidden, params[weight_names[-1]].mT), layer_inputs

    def members_step(
        params: dict[str, Tensor], data: dict[str, Tensor], gamma: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Run one step of every member; ``data`` contains the inputs by name."""
        gates: list[Tensor] = []
        batch_outputs, layer_inputs = forward(
            params, data["x_batch"], data["x_batch_extended"], "batch", gates
        )
        objective_value, error_by_class, static_batch = _stacked_loss(
            loss_name,
            batch_outputs.mT,
            data["y_batch"],
            gamma,
            True,
            one_hots.get(data["y_batch"], batch_outputs.mT),
        )
        assert error_by_class is not None
        error = error_by_class.mT
        gradients: dict[str, Tensor] = {}
        for layer in range(len(weight_names) - 1, -1, -1):
            if layer == 0 and len(weight_names) > 1:
                # weight and bias in one product with the input extended by ones
                extended = torch.bmm(data["x_batch_extended"].mT, error).mT
                gradients[weight_names[0]] = extended[:, :, :-1]
                gradients[bias_names[0]] = extended[:, :, -1]
                break
            gradients[weight_names[layer]] = torch.bmm(error.mT, layer_inputs[layer])
            gradients[bias_names[layer]] = error.sum(dim=1)
            if layer > 0:
                back = workspace.get(f"back {layer}", tuple(layer_inputs[layer].shape), error)
                error = torch.bmm(error, params[weight_names[layer]], out=back)
                if activation_name == "relu":
                    # autograd's ReLU backward: the gradient where the output is above 0
                    threshold = torch.ops.aten.threshold_backward.grad_input
                    threshold(error, layer_inputs[layer], 0.0, grad_input=error)
                else:
                    error.mul_(gates[layer - 1])

        y = data["y"]
        if full_batch:
            outputs = batch_outputs
            loss = objective_value
            static = static_batch
            minibatch_loss = torch.full_like(loss, math.nan)
        else:
            outputs = forward(params, data["x"], data["x_extended"], "train")[0]
            loss, _, static = _stacked_loss(loss_name, outputs.mT, y, gamma, False)
            minibatch_loss = objective_value
        val_outputs = forward(params, data["x_val"], data["x_val_extended"], "validation")[0]
        metrics = _stacked_metrics(
            ensemble,
            gradients,
            loss,
            static,
            minibatch_loss,
            outputs.mT,
            y,
            val_outputs.mT,
            data["y_val"],
        )
        return gradients, metrics

    def step(
        params: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        x_val: Tensor,
        y_val: Tensor,
        gamma: Tensor,
        x_batch: Tensor,
        y_batch: Tensor,
    ) -> tuple[dict[str, Tensor], Tensor]:
        with torch.no_grad():
            data = {
                "x": x,
                "y": y,
                "x_val": x_val,
                "y_val": y_val,
                "x_batch": x_batch,
                "y_batch": y_batch,
                "x_extended": with_ones(x, "train"),
                "x_val_extended": with_ones(x_val, "validation"),
                "x_batch_extended": with_ones(x_batch, "batch"),
            }
            gradients, metrics = members_step(params, data, gamma)
            return {name: gradients[name] for name in ensemble.names}, metrics

    return step


def _factored_step_function(
    ensemble: _Ensemble,
) -> Callable[..., tuple[dict[str, Tensor], Tensor]] | None:
    """Return the step of `_member_step_function` for one hidden ReLU layer, or None.

    With the input extended by a constant, x~ = (x, 1), the first layer W~1 = (W1 | b1) and
    the activation pattern m_nj = [W~1 x~_n > 0]_j (0 or 1), the network and both gradients are
    linear in m:

        f_c(x~_n) = sum_i x~_ni sum_j m_nj W~1_ji W2_cj + b2_c
        dL/dW2_cj = sum_i W~1_ji G_cij,    dL/dW~1_ji = sum_c W2_cj G_cij,
        G_cij = sum_n e_nc x~_ni m_nj,

    where e = dL/df. The outputs take one product of the pattern with (d + 1) C rows, and G
    takes another, in place of the layer-by-layer forward and backward passes. Both read the
    pattern of a group of members while it is in the cache. The second product computes the
    pattern again, because keeping all of it was slower. The route is taken where (d + 1) C
    does not exceed the width, as on the spiral (9 rows for 2 inputs and 3 classes).
    The sums run in another order than the layer-by-layer products, so results agree with
    `_mlp_step_function` to float rounding. Returns None for other networks.
    """
    model = ensemble.runs[0].model
    linears = _mlp_hessian.mlp_linears(model)
    if linears is None or len(linears) != 2:
        return None
    assert isinstance(model, models.MLP)
    width, inputs = linears[0].weight.shape
    classes = linears[1].weight.shape[0]
    rows = (inputs + 1) * classes
    if model.activation != "relu" or rows > width:
        return None
    weight_name, bias_name, output_weight_name, output_bias_name = ensemble.names
    loss_name = ensemble.runs[0].loss.name
    full_batch = ensemble.config.optimizer == "gd"
    workspace = _Workspace()
    one_hots = _OneHotCache()
    cache_bytes = _CACHE_BYTES
    fixed_samples: list[tuple[Tensor, Tensor, Tensor]] = []

    def extended_samples(parts: list[Tensor]) -> Tensor:
        """Return the parts' samples, each with a constant 1 appended, as (K, d + 1, samples)."""
        one = torch.ones(parts[0].shape[0], 1, 1, dtype=parts[0].dtype, device=parts[0].device)
        extended = []
        for part in parts:
            extended.append(torch.cat([part, one.expand(-1, part.shape[1], -1)], dim=2))
        return torch.cat(extended, dim=1).mT.contiguous()

    def step(
        params: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        x_val: Tensor,
        y_val: Tensor,
        gamma: Tensor,
        x_batch: Tensor,
        y_batch: Tensor,
    ) -> tuple[dict[str, Tensor], Tensor]:
        with torch.no_grad():
            # One pass over the mini-batch, the training set (for sgd) and the validation set.
            if full_batch:
                if (
                    not fixed_samples
                    or fixed_samples[0][0] is not x
                    or fixed_samples[0][1] is not x_val
                ):
                    fixed_samples[:] = [(x, x_val, extended_samples([x, x_val]))]
                samples = fixed_samples[0][2]
            else:
                samples = extended_samples([x_batch, x, x_val])
            count, _, sample_count = samples.shape
            batch_count = y_batch.shape[1]

            first = torch.cat([params[weight_name], params[bias_name][:, :, None]], dim=2)
            output_weight = params[output_weight_name]
            # (K, C (d + 1), width): row (c, i) contains W~1_ji W2_cj over j
            factors = workspace.get("factors", (count, classes, inputs + 1, width), x)
            torch.mul(output_weight[:, :, None, :], first.mT[:, None, :, :], out=factors)
            factors_by_row = factors.view(count, rows, width)
            products = workspace.get("products", (count, rows, sample_count), x)
            # Patterns of `group` members at a time, computed again below for G (see docstring).
            group = max(1, cache_bytes // (width * sample_count * x.element_size()))
            pattern = workspace.get("pattern", (group, width, sample_count), x)
            for start in range(0, count, group):
                end = min(start + group, count)
                piece = pattern[: end - start]
                torch.bmm(first[start:end], samples[start:end], out=piece).gt_(0)
                torch.bmm(factors_by_row[start:end], piece, out=products[start:end])
            products_by_input = products.view(count, classes, inputs + 1, sample_count)
            outputs = workspace.get("outputs", (count, classes, sample_count), x)
            outputs.copy_(params[output_bias_name][:, :, None].expand_as(outputs))
            for i in range(inputs + 1):
                outputs.addcmul_(products_by_input[:, :, i], samples[:, None, i])

            batch_outputs = outputs[:, :, :batch_count]
            objective_value, error, static_batch = _stacked_loss(
                loss_name, batch_outputs, y_batch, gamma, True, one_hots.get(y_batch, outputs)
            )
            assert error is not None
            # G as (K, C, d + 1, width), from the samples weighted by e as (K, C, d + 1, N)
            batch_samples = samples[:, :, :batch_count]
            weighted = workspace.get("weighted", (count, classes, inputs + 1, batch_count), x)
            torch.mul(error[:, :, None, :], batch_samples[:, None, :, :], out=weighted)
            weighted_by_row = weighted.view(count, rows, batch_count)
            sums = workspace.get("sums", (count, rows, width), x)
            batch_pattern = workspace.get("batch pattern", (group, width, batch_count), x)
            for start in range(0, count, group):
                end = min(start + group, count)
                piece = batch_pattern[: end - start]
                torch.bmm(first[start:end], batch_samples[start:end], out=piece).gt_(0)
                torch.bmm(weighted_by_row[start:end], piece.mT, out=sums[start:end])
            sums_by_input = sums.view(count, classes, inputs + 1, width)
            output_gradient = (sums_by_input * first.mT[:, None, :, :]).sum(dim=2)
            first_gradient = (sums_by_input * output_weight[:, :, None, :]).sum(dim=1)
            gradients = {
                weight_name: first_gradient[:, :inputs].mT.contiguous(),
                bias_name: first_gradient[:, inputs].contiguous(),
                output_weight_name: output_gradient,
                output_bias_name: error.sum(dim=2),
            }

            if full_batch:
                train_outputs = batch_outputs
                loss = objective_value
                static = static_batch
                minibatch_loss = torch.full_like(loss, math.nan)
            else:
                train_outputs = outputs[:, :, batch_count : batch_count + y.shape[1]]
                loss, _, static = _stacked_loss(loss_name, train_outputs, y, gamma, False)
                minibatch_loss = objective_value
            val_outputs = outputs[:, :, sample_count - y_val.shape[1] :]
            metrics = _stacked_metrics(
                ensemble,
                gradients,
                loss,
                static,
                minibatch_loss,
                train_outputs,
                y,
                val_outputs,
                y_val,
            )
            return gradients, metrics

    return step


def _stacked_metrics(
    ensemble: _Ensemble,
    gradients: dict[str, Tensor],
    loss: Tensor,
    static: Tensor,
    minibatch_loss: Tensor,
    train_outputs: Tensor,
    y: Tensor,
    val_outputs: Tensor,
    y_val: Tensor,
) -> Tensor:
    """Return the (K, 6) metrics of `_METRICS` from class-major (K, C, N) outputs."""
    # max(dim=1).indices, the first largest like argmax, is about 10x faster than argmax over
    # the class axis of these (K, C, N) views.
    train_accuracy = (train_outputs.max(dim=1).indices == y).double().mean(dim=1)
    val_accuracy = (val_outputs.max(dim=1).indices == y_val).double().mean(dim=1)
    flat = torch.cat([gradients[name].flatten(start_dim=1) for name in ensemble.names], dim=1)
    grad_norm = torch.sqrt(flat.double().square().sum(dim=1))
    metrics = [loss, static, train_accuracy, val_accuracy, grad_norm, minibatch_loss]
    return torch.stack([value.double() for value in metrics], dim=1)


def _stacked_loss(
    name: str,
    outputs: Tensor,
    targets: Tensor,
    gamma: Tensor,
    with_gradient: bool,
    one_hot: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Return each member's loss (K,), on request its gradient, and the static loss (K,).

    The formulas are those of `dynscope.losses.weighted_loss` with a leading member axis and the
    classes before the samples: ``outputs`` is (K, C, N), ``targets`` (K, N) and ``gamma``
    (K, C); ``one_hot`` is the targets as (K, C, N) in the outputs' dtype, computed when not
    given. The gradient in the outputs (K, C, N) includes the 1/N of the mean. The static loss
    (CE for the cross-entropy family, MSE otherwise) reuses the loss's terms.

    The reductions run over the class axis, which is not the last one. Written out as below,
    they take a few microseconds each, while ``torch.log_softmax(outputs, dim=1)`` took about
    170 us on 16 spiral members.
    """
    count = outputs.shape[2]
    if one_hot is None:
        one_hot = _one_hot(targets, outputs)
    sample_weight = gamma.gather(1, targets) if name in ("dce", "dmse1") else None
    gradient = None
    if name in ("ce", "dce"):
        shifted = outputs - outputs.amax(dim=1, keepdim=True)
        exponentials = shifted.exp()
        normalisers = exponentials.sum(dim=1)
        # -log p_y = log(sum_c exp(shifted_c)) - shifted_y
        per_sample = normalisers.log() - shifted.gather(1, targets[:, None, :])[:, 0, :]
        static_per_sample = per_sample
        if with_gradient:
            gradient = exponentials / normalisers[:, None, :] - one_hot
    else:
        residual = outputs - one_hot
        squared = residual * residual
        static_per_sample = squared.sum(dim=1)
        if name == "dmse2":
            per_sample = (squared * gamma[:, :, None]).sum(dim=1)
        else:
            per_sample = static_per_sample
        if with_gradient:
            gradient = residual * 2.0
            if name == "dmse2":
                gradient *= gamma[:, :, None]
    static = static_per_sample.mean(dim=1)
    if sample_weight is not None:
        per_sample = sample_weight * per_sample
    value = per_sample.mean(dim=1)
    if gradient is None:
        return value, None, static
    if sample_weight is not None:
        gradient *= (sample_weight / count)[:, None, :]
    else:
        gradient /= count
    return value, gradient, static


def _one_hot(targets: Tensor, like: Tensor) -> Tensor:
    """Return the (K, N) targets as (K, C, N) indicators with the dtype of ``like`` (K, C, N)."""
    classes = torch.arange(like.shape[1], device=like.device)
    return (targets[:, None, :] == classes[:, None]).to(like.dtype)


def _weighted_loss(name: str, outputs: Tensor, targets: Tensor, gamma: Tensor) -> Tensor:
    """Evaluate `dynscope.losses.weighted_loss` in a form that vmap over labels accepts.

    ``torch.nn.functional.one_hot`` checks the label values with ``.item()``, which vmap rejects
    under ``grad``, so the MSE family builds the one-hot targets by comparison here.
    """
    if name in ("ce", "dce"):
        return losses.weighted_loss(name, outputs, targets, gamma)
    # NOTE: this repeats the MSE-family formulas of dynscope.losses.weighted_loss; the ensemble
    # tests compare every member's record with a single run, which catches any drift.
    classes = torch.arange(outputs.shape[1], device=outputs.device)
    one_hot = (targets[:, None] == classes).to(outputs.dtype)
    squared = (outputs - one_hot) ** 2
    if name == "mse":
        return squared.sum(dim=1).mean()
    if name == "dmse1":
        return (gamma[targets] * squared.sum(dim=1)).mean()
    return (squared * gamma).sum(dim=1).mean()


def _train(
    ensemble: _Ensemble, stop_signal: dict[str, str | None], quiet: bool
) -> list[RecordResult]:
    config = ensemble.config
    count = len(ensemble.runs)
    step_function = (
        _factored_step_function(ensemble)
        or _mlp_step_function(ensemble)
        or _member_step_function(ensemble)
    )
    gammas = _GammaBlocks(ensemble)
    momentum = None
    if config.momentum:
        momentum = {name: torch.zeros_like(value) for name, value in ensemble.params.items()}

    started = time.perf_counter()
    statuses = ["complete"] * count
    last_steps = [config.steps - 1] * count
    diverged_values: list[float | None] = [None] * count
    active = list(range(count))
    bar = tqdm(
        total=config.steps,
        disable=quiet or not sys.stderr.isatty(),
        unit="step",
        file=sys.stderr,
    )
    try:
        for step in range(config.steps):
            gamma_values, gamma = gammas.at(step)
            x_batch, y_batch = _batches(ensemble, step)
            gradients, metrics = step_function(
                ensemble.params,
                ensemble.x_train,
                ensemble.y_train,
                ensemble.x_val,
                ensemble.y_val,
                gamma,
                x_batch,
                y_batch,
            )
            rows = metrics.tolist()
            # A finite gradient norm means finite gradients. An infinite norm can also come from
            # finite gradients whose squares overflow, so then the gradients themselves decide.
            finite = [math.isfinite(row[_METRICS.index("grad_norm")]) for row in rows]
            if not all(finite):
                finite = _finite_gradients(gradients).tolist()

            for k in list(active):
                if not _record_member_step(ensemble, k, step, rows[k], gamma_values[k]):
                    # Like the recorder: a non-finite loss is not written as a row.
                    _stop_diverged(ensemble, k, step, momentum, rows[k][0])
                elif not finite[k]:
                    _stop_diverged(ensemble, k, step, momentum, rows[k][0])
                else:
                    continue
                statuses[k] = "diverged"
                last_steps[k] = step - 1
                diverged_values[k] = rows[k][0]
                active.remove(k)
            if not active:
                break

            _update(ensemble.params, gradients, momentum, config)
            bar.update(1)

            interrupted = stop_signal["name"] is not None
            if interrupted or (step + 1) % config.flush_every == 0 or step + 1 == config.steps:
                for k in active:
                    ensemble.writers[k].flush(_member_state(ensemble, k, step + 1, momentum))
            if interrupted:
                for k in active:
                    statuses[k] = "interrupted"
                    last_steps[k] = step
                break
    finally:
        bar.close()

    for k in active:
        ensemble.writers[k].close(statuses[k])
    return _results(ensemble, statuses, last_steps, diverged_values, started, stop_signal)


class _GammaBlocks:
    """Each member's class weights, computed for blocks of steps at once.

    One vectorised `dynscope.losses.gamma` call per member and block replaces two calls per
    member and step, which cost about 1.4 ms a step for 16 members, half of the batched
    training step at width 100.
    """

    def __init__(self, ensemble: _Ensemble, block: int = 1024) -> None:
        self.ensemble = ensemble
        self.block = block
        self.start = -1
        self.values = np.empty((0, len(ensemble.runs), 0))
        self.tensors = torch.empty(0)

    def at(self, step: int) -> tuple[np.ndarray, Tensor]:
        """Return the (K, C) weights at ``step`` as an array and as a tensor of the data."""
        start = step - step % self.block
        if start != self.start:
            steps = np.arange(start, start + self.block)
            self.values = np.stack([run.loss.gamma_at(steps) for run in self.ensemble.runs], axis=1)
            like = self.ensemble.x_train
            self.tensors = torch.as_tensor(self.values, dtype=like.dtype, device=like.device)
            self.start = start
        return self.values[step - start], self.tensors[step - start]


def _batches(ensemble: _Ensemble, step: int) -> tuple[Tensor, Tensor]:
    """Return each member's mini-batch, drawn from its own seed as in `recorder`, or all data."""
    if ensemble.config.optimizer == "gd":
        return ensemble.x_train, ensemble.y_train
    x_batches = []
    y_batches = []
    count = ensemble.y_train.shape[1]
    for k, run in enumerate(ensemble.runs):
        indices = recorder._batch_indices(run.config, step, count, ensemble.x_train.device)
        x_batches.append(ensemble.x_train[k, indices])
        y_batches.append(ensemble.y_train[k, indices])
    return torch.stack(x_batches), torch.stack(y_batches)


def _finite_gradients(gradients: dict[str, Tensor]) -> Tensor:
    flags = [torch.isfinite(gradient).flatten(1).all(dim=1) for gradient in gradients.values()]
    return torch.stack(flags).all(dim=0)


def _record_member_step(
    ensemble: _Ensemble, k: int, step: int, row: list[float], gamma: np.ndarray
) -> bool:
    """Append member k's row, probe and snapshot; return False when its loss is not finite."""
    config = ensemble.config
    values = dict(zip(_METRICS, row, strict=True))
    if not math.isfinite(values["loss"]):
        return False

    extra: dict[str, Any] = {}
    if config.optimizer == "sgd":
        extra["minibatch_loss"] = values["minibatch_loss"]
    ensemble.writers[k].append_step(
        step,
        loss=values["loss"],
        static_loss=values["static_loss"],
        train_accuracy=values["train_accuracy"],
        val_accuracy=values["val_accuracy"],
        grad_norm=values["grad_norm"],
        lr=config.lr,
        gamma=gamma,
        **extra,
    )

    probe = config.hessian_every and config.spectrum != "none" and step % config.hessian_every == 0
    snapshot = config.snapshot_every and step % config.snapshot_every == 0
    if probe or snapshot:
        _load_member(ensemble, k)
    if probe:
        recorder._record_probe(ensemble.runs[k], ensemble.writers[k], step)
    if snapshot:
        ensemble.writers[k].append_snapshot(step, recorder._snapshot(ensemble.runs[k]))
    return True


def _load_member(ensemble: _Ensemble, k: int) -> None:
    """Copy member k's parameters into its own model, for probes, snapshots and states."""
    flat = torch.cat([ensemble.params[name][k].reshape(-1) for name in ensemble.names])
    models.assign_parameters(ensemble.runs[k].model, flat)


def _member_state(
    ensemble: _Ensemble, k: int, next_step: int, momentum: dict[str, Tensor] | None
) -> dict[str, np.ndarray]:
    """Return member k's resume state in the recorder's format, so its record resumes alone."""
    _load_member(ensemble, k)
    buffers = None
    if momentum is not None:
        buffers = [momentum[name][k] for name in ensemble.names]
    return recorder._state(ensemble.runs[k], next_step, buffers)


def _stop_diverged(
    ensemble: _Ensemble,
    k: int,
    step: int,
    momentum: dict[str, Tensor] | None,
    loss_value: float,
) -> None:
    logger.error(
        "member with seed %d diverged at step %d: loss = %r",
        ensemble.runs[k].config.seed,
        step,
        loss_value,
    )
    ensemble.writers[k].flush(_member_state(ensemble, k, step, momentum))
    ensemble.writers[k].close("diverged")


@torch.no_grad()
def _update(
    params: dict[str, Tensor],
    gradients: dict[str, Tensor],
    momentum: dict[str, Tensor] | None,
    config: RecordConfig,
) -> None:
    """Apply one step to every member, in the same operations as the recorder's update."""
    for name, parameter in params.items():
        if momentum is None:
            parameter.sub_(config.lr * gradients[name])
        else:
            momentum[name].mul_(config.momentum).add_(gradients[name])
            parameter.sub_(config.lr * momentum[name])


def _results(
    ensemble: _Ensemble,
    statuses: list[str],
    last_steps: list[int],
    diverged_values: list[float | None],
    started: float,
    stop_signal: dict[str, str | None],
) -> list[RecordResult]:
    wall_time = time.perf_counter() - started
    results = []
    for k, writer in enumerate(ensemble.writers):
        steps_done = last_steps[k] + 1
        results.append(
            RecordResult(
                path=Path(writer.path),
                status=statuses[k],
                last_step=last_steps[k],
                wall_time=wall_time,
                steps_per_second=steps_done / wall_time if wall_time > 0 else math.nan,
                signal_name=stop_signal["name"],
                diverged_value=diverged_values[k],
            )
        )
    return results
