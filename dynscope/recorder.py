"""Train one network under a (dynamical) loss and record every step into a netCDF file.

The recorder composes the other modules: it loads the data, builds the MLP and the loss, runs
full-batch gradient descent (or mini-batch SGD, with optional heavy-ball momentum), probes the
Hessian every `hessian_every` steps and streams rows through `dynscope.store`.

Every step t records the state *before* the update at t: the loss at theta_t, its gradient norm,
the accuracies and Gamma(t). A probe at step t measures the Hessian of the loss being minimised at
step t, at theta_t. After `flush_every` steps the rows and the resume state (parameters, momentum
buffer, next step) are made durable, so `resume=True` continues from the last flush to the same
values as an uninterrupted run. Mini-batches are drawn from a generator seeded by the seed and the
epoch, so resuming needs no random-number state.

Limits: one process, one device; a divergence (NaN or infinite loss or parameters) stops the run
with status "diverged" and keeps every step before it.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dynscope import __version__, curvature, data, losses, models, store
from dynscope.config import RecordConfig

logger = logging.getLogger(__name__)

# Exit codes the CLI uses for each final status; 130 and 143 follow the shell's 128 + signal.
EXIT_CODES = {"complete": 0, "diverged": 3, "interrupted": 130, "terminated": 143}


@dataclass(frozen=True)
class RecordResult:
    """Outcome of one recording: where it is, how it ended and how fast it ran."""

    path: Path
    status: str
    last_step: int
    wall_time: float
    steps_per_second: float
    signal_name: str | None = None
    diverged_value: float | None = None

    @property
    def exit_code(self) -> int:
        """Process exit code for this outcome (0 complete, 3 diverged, 130 SIGINT, 143 SIGTERM)."""
        if self.status == "interrupted" and self.signal_name == "SIGTERM":
            return EXIT_CODES["terminated"]
        return EXIT_CODES[self.status]


@dataclass
class _Run:
    """Everything one training loop needs, built once from the config."""

    config: RecordConfig
    dataset: data.Dataset
    model: models.MLP
    loss: losses.ClassificationLoss
    static_loss: losses.ClassificationLoss
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    projection: torch.Tensor | None
    # The previous top-k probe, whose top eigenvector warm-starts the next Lanczos run.
    previous: curvature.Spectrum | None = None


def record(
    config: RecordConfig,
    output: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    quiet: bool = False,
) -> RecordResult:
    """Train under `config` and write the record to `output`.

    Parameters
    ----------
    config
        Options of the run; ignored when resuming, where the record's own config is used.
    output
        Path of the netCDF record. Its folder must exist.
    force
        Overwrite an existing record.
    resume
        Continue the record at `output` from its last flush.
    quiet
        Hide the progress bar (it also hides itself when stderr is not a terminal).

    Returns
    -------
    RecordResult
        The final status ("complete", "diverged" or "interrupted") and timing.

    Raises
    ------
    ValueError
        For an invalid option or output path, before any file is created.
    """
    output = Path(output)
    if resume:
        writer, state = store.RecordWriter.resume(output)
        config = RecordConfig.from_json(writer.config_json).validate()
        run = _build_run(config)
        start_step = _restore_state(run, state)
        if start_step >= config.steps:
            writer.close("complete")
            raise ValueError(f"record {output} is already complete; nothing to resume")
        momentum = _momentum_from_state(run, state)
    else:
        config.validate()
        _check_output(output, force)
        run = _build_run(config)
        _check_sizes(run)
        writer = _create_writer(run, output, force)
        start_step = 0
        momentum = None

    with _signal_flag() as stop_signal:
        return _train(run, writer, start_step, momentum, stop_signal, quiet)


def _check_output(output: Path, force: bool) -> None:
    if not output.parent.exists():
        raise ValueError(
            f"output folder not found: {output.parent}; create it first or choose another path"
        )
    if output.exists() and not force:
        raise ValueError(
            f"output file exists: {output}; pass --force to overwrite it "
            "(or --resume to continue an interrupted record)"
        )
    if output.is_dir():
        raise ValueError(f"output {output} is a folder; give a file path such as run.nc")


def _check_sizes(run: _Run) -> None:
    """Check the options bounded by the model and data sizes, before any file is written."""
    config = run.config
    num_params = sum(p.numel() for p in run.model.parameters())
    if config.hessian_every and config.spectrum == "topk" and config.topk > num_params:
        raise ValueError(
            f"invalid topk {config.topk}: the model has {num_params} parameters, so use "
            f"--topk {num_params} or less"
        )
    if config.eigenvectors > num_params:
        raise ValueError(
            f"invalid eigenvectors {config.eigenvectors}: the model has {num_params} parameters, "
            f"so use --eigenvectors {num_params} or less"
        )
    if config.spectrum == "topk" and config.eigenvectors > config.topk:
        raise ValueError(
            f"invalid eigenvectors {config.eigenvectors}: top-k probes find {config.topk} "
            "eigenvectors, so use --eigenvectors at most --topk"
        )
    ntk_size = run.x_train.shape[0] * run.dataset.num_classes
    if config.ntk > ntk_size:
        raise ValueError(
            f"invalid ntk {config.ntk}: the neural tangent kernel has {ntk_size} eigenvalues "
            f"(training points x classes), so use --ntk {ntk_size} or less"
        )
    if config.param_projection > num_params:
        raise ValueError(
            f"invalid param-projection {config.param_projection}: the model has {num_params} "
            "parameters, so project to fewer dimensions or drop the option"
        )
    if config.batch_size > run.x_train.shape[0]:
        raise ValueError(
            f"invalid batch-size {config.batch_size}: the training set has "
            f"{run.x_train.shape[0]} points, so use a smaller mini-batch"
        )


def _resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} is not available on this machine; use --device cpu")
    return torch.device(name)


def _build_run(config: RecordConfig) -> _Run:
    device = _resolve_device(config.device)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    dataset = data.load_dataset(config)

    model = models.build_mlp(
        dataset.x_train.shape[1],
        dataset.num_classes,
        width=config.width,
        depth=config.depth,
        activation=config.activation,
        init=config.init,
        seed=config.seed,
        dtype=dtype,
    ).to(device)

    loss = losses.make_loss(
        config.loss,
        dataset.num_classes,
        amplitude=config.amplitude,
        period=config.period,
        schedule=config.schedule,
        static_tail=config.static_tail,
        total_steps=config.steps,
        class_order=config.class_order,
        seed=config.seed,
    )

    projection = None
    num_params = sum(p.numel() for p in model.parameters())
    if config.param_projection:
        # A Gaussian projection keeps distances up to a factor near 1 (Johnson-Lindenstrauss).
        generator = torch.Generator().manual_seed(config.seed + 7919)
        projection = torch.randn(
            num_params, config.param_projection, generator=generator, dtype=torch.float64
        ) / math.sqrt(config.param_projection)

    def tensor(array: np.ndarray, kind: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(array).to(device=device, dtype=kind)

    return _Run(
        config=config,
        dataset=dataset,
        model=model,
        loss=loss,
        static_loss=loss.static(),
        x_train=tensor(dataset.x_train, dtype),
        y_train=tensor(dataset.y_train, torch.int64),
        x_val=tensor(dataset.x_val, dtype),
        y_val=tensor(dataset.y_val, torch.int64),
        projection=projection,
    )


def _num_eigs(run: _Run) -> int:
    num_params = sum(p.numel() for p in run.model.parameters())
    if run.config.spectrum == "full":
        return num_params
    if run.config.spectrum == "topk":
        return min(run.config.topk, num_params)
    return 0


def _create_writer(run: _Run, output: Path, force: bool) -> store.RecordWriter:
    config = run.config
    num_params = sum(p.numel() for p in run.model.parameters())
    attrs: dict[str, Any] = {
        "lr": config.lr,
        "width": config.width,
        "depth": config.depth,
        "seed": config.seed,
        "amplitude": config.amplitude,
        "period": config.period,
        "loss": config.loss,
        "dataset": config.dataset,
        "schedule": config.schedule,
        "activation": config.activation,
        "optimizer": config.optimizer,
        "num_params": num_params,
        "num_train": int(run.dataset.x_train.shape[0]),
        "num_val": int(run.dataset.x_val.shape[0]),
        "device": str(config.device),
        "dynscope_version": __version__,
        "torch_version": torch.__version__,
    }
    return store.RecordWriter.create(
        output,
        config_json=config.to_json(),
        attrs=attrs,
        labels=list(range(run.dataset.num_classes)),
        num_params=config.param_projection or num_params,
        num_eigs=_num_eigs(run) if config.hessian_every else 0,
        compression=config.compression,
        param_dtype=config.param_dtype,
        force=force,
    )


def _restore_state(run: _Run, state: dict[str, np.ndarray]) -> int:
    flat = torch.as_tensor(state["params"])
    models.assign_parameters(run.model, flat)
    if "previous_eigenvector" in state:
        run.previous = curvature.Spectrum(
            eigenvalues=np.empty(0),
            eigenvectors=state["previous_eigenvector"][None, :],
            trace=float("nan"),
            residuals=None,
            method="restored warm start",
        )
    return int(state["next_step"])


def _momentum_from_state(run: _Run, state: dict[str, np.ndarray]) -> list[torch.Tensor] | None:
    if "momentum" not in state:
        return None
    flat = torch.as_tensor(state["momentum"])
    buffers = []
    offset = 0
    for parameter in run.model.parameters():
        size = parameter.numel()
        chunk = flat[offset : offset + size].view_as(parameter)
        buffers.append(chunk.to(device=parameter.device, dtype=parameter.dtype).clone())
        offset += size
    return buffers


@contextmanager
def _signal_flag() -> Iterator[dict[str, str | None]]:
    """Turn SIGINT and SIGTERM into a flag the training loop checks after each step."""
    flag: dict[str, str | None] = {"name": None}
    if threading.current_thread() is not threading.main_thread():
        # Signal handlers can only be installed from the main thread (Dask workers run elsewhere).
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        flag["name"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _train(
    run: _Run,
    writer: store.RecordWriter,
    start_step: int,
    momentum: list[torch.Tensor] | None,
    stop_signal: dict[str, str | None],
    quiet: bool,
) -> RecordResult:
    config = run.config
    parameters: list[torch.Tensor] = list(run.model.parameters())
    if config.momentum and momentum is None:
        momentum = [torch.zeros_like(p) for p in parameters]

    started = time.perf_counter()
    status = "complete"
    diverged_value: float | None = None
    step = start_step
    show_bar = not quiet and sys.stderr.isatty()
    bar = tqdm(
        total=config.steps, initial=start_step, disable=not show_bar, unit="step", file=sys.stderr
    )
    try:
        for step in range(start_step, config.steps):
            gradients, loss_value = _record_step(run, writer, step)
            if not _all_finite(loss_value, gradients):
                status = "diverged"
                diverged_value = loss_value
                break

            _update(parameters, gradients, momentum, config)
            bar.update(1)

            if (step + 1) % config.flush_every == 0 or step + 1 == config.steps:
                writer.flush(_state(run, step + 1, momentum))
            if stop_signal["name"] is not None:
                status = "interrupted"
                writer.flush(_state(run, step + 1, momentum))
                break
    finally:
        bar.close()

    last_step = step if status != "diverged" else step - 1
    if status == "diverged":
        logger.info("training diverged at step %d: loss = %r", step, diverged_value)
        writer.flush(_state(run, step, momentum))
    writer.close(status)

    wall_time = time.perf_counter() - started
    steps_done = max(last_step + 1 - start_step, 0)
    return RecordResult(
        path=Path(writer.path),
        status=status,
        last_step=last_step,
        wall_time=wall_time,
        steps_per_second=steps_done / wall_time if wall_time > 0 else math.nan,
        signal_name=stop_signal["name"],
        diverged_value=diverged_value,
    )


def _record_step(
    run: _Run, writer: store.RecordWriter, step: int
) -> tuple[list[torch.Tensor], float]:
    """Evaluate the losses at theta_step, append the row and probes, and return the gradient."""
    config = run.config
    gamma = run.loss.gamma_at(step)
    gamma_tensor = torch.as_tensor(gamma, dtype=run.x_train.dtype, device=run.x_train.device)

    outputs = run.model(run.x_train)
    loss = losses.weighted_loss(run.loss.name, outputs, run.y_train, gamma_tensor)
    values: dict[str, Any] = {}
    if config.optimizer == "sgd":
        indices = _batch_indices(config, step, run.y_train.shape[0], run.x_train.device)
        batch_outputs = run.model(run.x_train[indices])
        objective = losses.weighted_loss(
            run.loss.name, batch_outputs, run.y_train[indices], gamma_tensor
        )
        values["minibatch_loss"] = float(objective.detach())
    else:
        objective = loss
    gradients = list(torch.autograd.grad(objective, list(run.model.parameters())))

    with torch.no_grad():
        static = run.static_loss(outputs, run.y_train)
        train_accuracy = (outputs.argmax(dim=1) == run.y_train).double().mean()
        val_outputs = run.model(run.x_val)
        val_accuracy = (val_outputs.argmax(dim=1) == run.y_val).double().mean()
        grad_norm = torch.sqrt(torch.stack([(g.double() ** 2).sum() for g in gradients]).sum())

    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        return gradients, loss_value

    writer.append_step(
        step,
        loss=loss_value,
        static_loss=float(static),
        train_accuracy=float(train_accuracy),
        val_accuracy=float(val_accuracy),
        grad_norm=float(grad_norm),
        lr=config.lr,
        gamma=gamma,
        **values,
    )
    if config.hessian_every and config.spectrum != "none" and step % config.hessian_every == 0:
        _record_probe(run, writer, step)
    if config.snapshot_every and step % config.snapshot_every == 0:
        writer.append_snapshot(step, _snapshot(run))
    return gradients, loss_value


def _record_probe(run: _Run, writer: store.RecordWriter, step: int) -> None:
    config = run.config
    spectrum = curvature.probe(
        run.model,
        run.loss,
        run.x_train,
        run.y_train,
        step,
        spectrum=config.spectrum,
        topk=config.topk,
        # Top-k probes keep at least one eigenvector to warm-start the next probe.
        eigenvectors=max(config.eigenvectors, 1 if config.spectrum == "topk" else 0),
        previous=run.previous,
    )
    run.previous = spectrum
    extras: dict[str, np.ndarray] = {}
    if config.eigenvectors and spectrum.eigenvectors is not None:
        extras["top_eigenvectors"] = spectrum.eigenvectors[: config.eigenvectors]
    if spectrum.residuals is not None:
        extras["eigenvalue_residuals"] = spectrum.residuals
    if config.ntk:
        extras["ntk_eigenvalues"] = curvature.ntk_eigenvalues(run.model, run.x_train, config.ntk)
    writer.append_probe(step, spectrum.eigenvalues, spectrum.trace, **extras)


def _snapshot(run: _Run) -> np.ndarray:
    flat = models.flatten_parameters(run.model).double().cpu()
    if run.projection is not None:
        flat = flat @ run.projection
    return flat.numpy()


def _batch_indices(
    config: RecordConfig, step: int, count: int, device: torch.device
) -> torch.Tensor:
    """Return the mini-batch of `step`: epoch-wise shuffling seeded by (seed, epoch)."""
    batches_per_epoch = max(count // config.batch_size, 1)
    epoch, position = divmod(step, batches_per_epoch)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    permutation = torch.randperm(count, generator=generator)
    start = position * config.batch_size
    return permutation[start : start + config.batch_size].to(device)


def _all_finite(loss_value: float, gradients: list[torch.Tensor]) -> bool:
    if not math.isfinite(loss_value):
        return False
    return all(bool(torch.isfinite(g).all()) for g in gradients)


@torch.no_grad()
def _update(
    parameters: list[torch.Tensor],
    gradients: list[torch.Tensor],
    momentum: list[torch.Tensor] | None,
    config: RecordConfig,
) -> None:
    """Apply one step of gradient descent, with heavy-ball momentum when it is set."""
    if momentum is None:
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter.sub_(config.lr * gradient)
        return
    for parameter, gradient, buffer in zip(parameters, gradients, momentum, strict=True):
        buffer.mul_(config.momentum).add_(gradient)
        parameter.sub_(config.lr * buffer)


def _state(run: _Run, next_step: int, momentum: list[torch.Tensor] | None) -> dict[str, np.ndarray]:
    state = {
        "params": models.flatten_parameters(run.model).cpu().numpy(),
        "next_step": np.asarray(next_step, dtype=np.int64),
    }
    if momentum is not None:
        state["momentum"] = torch.cat([b.reshape(-1) for b in momentum]).cpu().numpy()
    if run.previous is not None and run.previous.eigenvectors is not None:
        state["previous_eigenvector"] = np.asarray(run.previous.eigenvectors[0])
    return state
