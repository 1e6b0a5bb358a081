"""Compute dynamical loss functions: class weights that oscillate in time, and the losses.

With C classes, amplitude A >= 1 and period T steps, the class in focus at step t is
``c(t) = floor(t / T) mod C`` (or a seeded random permutation of the classes per cycle of C
periods) and the phase is ``tau = t mod T``. The focus class gets the raw weight ``w(tau / T)``,
every other class the raw weight 1, and the weights are normalised to sum to C:
``Gamma_k(t) = C * raw_k / sum(raw)``. With A = 1 every built-in shape gives Gamma = 1, the
static loss.

Losses (f(x_n) the network output, e_y the one-hot target, N samples, means over samples):

- ``ce``: cross-entropy; ``dce``: cross-entropy of sample n weighted by ``Gamma_{y_n}(t)``;
- ``mse``: ``||f(x_n) - e_{y_n}||^2``; ``dmse1``: the same weighted by ``Gamma_{y_n}(t)``;
  ``dmse2``: ``sum_k Gamma_k(t) (f_k(x_n) - [k = y_n])^2`` (weights per output channel).

Every dynamical loss is minimal exactly where its static counterpart is, because all weights stay
positive. The weights are computed in float64 with numpy and converted to the outputs' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeAlias

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional

LOSSES = ("ce", "dce", "mse", "dmse1", "dmse2")
STATIC_LOSSES = ("ce", "mse")
SCHEDULES = ("triangle", "sine", "square")
CLASS_ORDERS = ("sequential", "random")

Schedule: TypeAlias = str | Callable[[float], float]
"""A built-in shape name or a callable mapping the phase tau / T in [0, 1) to a raw weight."""


def gamma(
    step: int | np.ndarray,
    num_classes: int,
    amplitude: float,
    period: int,
    schedule: Schedule = "triangle",
    static_tail: int = 0,
    total_steps: int | None = None,
    class_order: str = "sequential",
    seed: int = 0,
) -> np.ndarray:
    """Compute the class weights Gamma(t) of a dynamical loss at one step or many steps.

    Parameters
    ----------
    step
        A non-negative step number, or an array of them (any shape is flattened).
    num_classes
        Number of classes C >= 2.
    amplitude
        Peak raw weight A >= 1 of the class in focus (ignored by a callable schedule).
    period
        Number of steps T of one oscillation; each class stays in focus for one period.
    schedule
        ``"triangle"`` (linear rise from 1 to A at T/2, then back), ``"sine"``
        (``1 + (A-1) sin^2(pi tau/T)``), ``"square"`` (A during the middle half of the period,
        ``T/4 <= tau < 3T/4``, 1 otherwise) or a callable ``w(phase) -> raw weight`` with
        ``phase = tau / T`` in [0, 1). A callable is called once per distinct phase with a float
        and must return a finite weight above 0.
    static_tail
        Number of final steps (``t >= total_steps - static_tail``) that get Gamma = 1.
    total_steps
        Length of the run; needed only when ``static_tail > 0``.
    class_order
        ``"sequential"`` (class ``floor(t/T) mod C``) or ``"random"`` (the order of the classes
        within each cycle of C periods is a permutation drawn from ``seed`` and the cycle index).
    seed
        Seed of the random class order.

    Returns
    -------
    numpy.ndarray
        float64 weights that are positive and sum to C: shape (C,) for an integer step, (S, C)
        for an array of S steps.
    """
    _check_schedule_options(num_classes, amplitude, period, schedule, class_order, seed)
    steps = np.asarray(step)
    scalar = steps.ndim == 0
    steps = steps.reshape(-1)
    if steps.size and not np.issubdtype(steps.dtype, np.integer):
        raise ValueError(f"invalid step dtype {steps.dtype}: give integer step numbers")
    steps = steps.astype(np.int64)
    if steps.size and steps.min() < 0:
        raise ValueError(f"invalid step {int(steps.min())}: steps start at 0")
    if static_tail < 0:
        raise ValueError(f"invalid static_tail {static_tail}: use a number of steps >= 0")
    if static_tail > 0 and total_steps is None:
        raise ValueError(
            "missing total_steps: static_tail > 0 needs the length of the run; pass total_steps"
        )

    focus = _focus_class(steps, num_classes, period, class_order, seed)
    phase = (steps % period) / period
    weight = _focus_weight(phase, amplitude, schedule)

    raw = np.ones((steps.size, num_classes))
    raw[np.arange(steps.size), focus] = weight
    weights = num_classes * raw / raw.sum(axis=1, keepdims=True)

    if static_tail > 0 and total_steps is not None:
        weights[steps >= total_steps - static_tail] = 1.0
    if scalar:
        return weights[0]
    return weights


def _check_schedule_options(
    num_classes: int,
    amplitude: float,
    period: int,
    schedule: Schedule,
    class_order: str,
    seed: int,
) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"invalid num_classes {num_classes!r}: use an integer >= 2")
    if not (math.isfinite(amplitude) and amplitude >= 1.0):
        raise ValueError(f"invalid amplitude {amplitude!r}: use A >= 1 (A = 1 is the static loss)")
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"invalid period {period!r}: use an integer number of steps >= 1")
    if not callable(schedule) and schedule not in SCHEDULES:
        raise ValueError(
            f"invalid schedule {schedule!r}: use one of {', '.join(SCHEDULES)} "
            "or a callable w(phase) -> raw weight"
        )
    if class_order not in CLASS_ORDERS:
        raise ValueError(
            f"invalid class_order {class_order!r}: use one of {', '.join(CLASS_ORDERS)}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"invalid seed {seed!r}: use an integer in [0, 2**64)")


def _focus_class(
    steps: np.ndarray, num_classes: int, period: int, class_order: str, seed: int
) -> np.ndarray:
    """Return the class in focus at each step."""
    position = (steps // period) % num_classes
    if class_order == "sequential":
        return position

    # Each cycle of C periods orders the classes by a 64-bit hash of (seed, cycle, class). This
    # gives a uniform random permutation per cycle without a sequential generator, so the order
    # does not depend on which steps are requested, and a resumed run gets the same order.
    cycle = steps // (period * num_classes)
    distinct, inverse = np.unique(cycle, return_inverse=True)
    cycle_keys = _splitmix64(
        _splitmix64(np.array([seed], dtype=np.uint64)) ^ distinct.astype(np.uint64)
    )
    classes = np.arange(num_classes, dtype=np.uint64)
    keys = _splitmix64(cycle_keys[:, None] + _GOLDEN_GAMMA * (classes[None, :] + np.uint64(1)))
    permutations = np.argsort(keys, axis=1)
    return permutations[inverse.reshape(-1), position]


_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """Hash uint64 values with the SplitMix64 output function (wrapping 64-bit arithmetic)."""
    mixed = values + _GOLDEN_GAMMA
    mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return mixed ^ (mixed >> np.uint64(31))


def _focus_weight(phase: np.ndarray, amplitude: float, schedule: Schedule) -> np.ndarray:
    """Return the raw weight of the focus class at each phase tau / T in [0, 1)."""
    if callable(schedule):
        return _callable_weight(phase, schedule)
    if schedule == "triangle":
        rising = 1.0 + 2.0 * (amplitude - 1.0) * phase
        falling = 2.0 * amplitude - 1.0 - 2.0 * (amplitude - 1.0) * phase
        return np.where(phase < 0.5, rising, falling)
    if schedule == "sine":
        return 1.0 + (amplitude - 1.0) * np.sin(np.pi * phase) ** 2
    # square: A during the middle half of the period
    return np.where((phase >= 0.25) & (phase < 0.75), amplitude, 1.0)


def _callable_weight(phase: np.ndarray, schedule: Callable[[float], float]) -> np.ndarray:
    # At most T distinct phases exist, so calling once per distinct phase stays cheap for long runs.
    distinct, inverse = np.unique(phase, return_inverse=True)
    values = np.array([float(schedule(float(p))) for p in distinct], dtype=np.float64)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(
            f"invalid raw weight {values[first]!r} from the schedule at phase {distinct[first]}: "
            "a schedule must return a finite weight above 0"
        )
    return values[inverse.reshape(-1)]


def weighted_loss(
    name: str, outputs: Tensor, targets: Tensor, gamma: Tensor | np.ndarray
) -> Tensor:
    """Evaluate a loss formula for given class weights.

    Parameters
    ----------
    name
        One of ``ce``, ``dce``, ``mse``, ``dmse1``, ``dmse2``. The static names ``ce`` and ``mse``
        ignore ``gamma``, so that ``weighted_loss(loss.static().name, ...)`` is always the
        static loss.
    outputs
        Network outputs (logits for the cross-entropy family) of shape (N, C).
    targets
        Integer labels of shape (N,) with values in 0..C-1.
    gamma
        Class weights of shape (C,); arrays are converted to the outputs' dtype and device.

    Returns
    -------
    torch.Tensor
        The scalar loss, a mean over the N samples.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: use one of {', '.join(LOSSES)}")
    if outputs.ndim != 2:
        raise ValueError(f"invalid outputs shape {tuple(outputs.shape)}: expected (N, C)")
    if targets.shape != outputs.shape[:1]:
        raise ValueError(
            f"invalid targets shape {tuple(targets.shape)}: expected ({outputs.shape[0]},), "
            "one integer label per row of outputs"
        )
    num_classes = outputs.shape[1]
    weights = torch.as_tensor(gamma, dtype=outputs.dtype, device=outputs.device)
    if weights.shape != (num_classes,):
        raise ValueError(
            f"invalid gamma shape {tuple(weights.shape)}: expected ({num_classes},), "
            "one weight per output"
        )

    if name in ("ce", "dce"):
        per_sample = functional.cross_entropy(outputs, targets, reduction="none")
        if name == "ce":
            return per_sample.mean()
        return (weights[targets] * per_sample).mean()

    one_hot = functional.one_hot(targets, num_classes).to(outputs.dtype)
    squared = (outputs - one_hot) ** 2
    if name == "mse":
        return squared.sum(dim=1).mean()
    if name == "dmse1":
        return (weights[targets] * squared.sum(dim=1)).mean()
    return (squared * weights).sum(dim=1).mean()


class ClassificationLoss(nn.Module):
    """Base of the losses: a module called as ``loss(outputs, targets, step=t)``.

    Attributes
    ----------
    name
        The loss name used in configs and records (``ce``, ``dce``, ``mse``, ``dmse1``,
        ``dmse2``).
    num_classes
        Number of classes C, or None for a static loss built without it (it then takes C from
        the outputs).
    """

    name: str = ""

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(f"invalid num_classes {num_classes!r}: use an integer >= 2")
        self.num_classes = num_classes

    def forward(self, outputs: Tensor, targets: Tensor, step: int = 0) -> Tensor:
        """Evaluate the loss at a training step (a mean over the samples)."""
        return weighted_loss(self.name, outputs, targets, self.gamma_at(step, outputs.shape[-1]))

    def gamma_at(self, step: int | np.ndarray, num_classes: int | None = None) -> np.ndarray:
        """Return the class weights at a step, (C,), or at an array of S steps, (S, C).

        ``num_classes`` is needed only for a static loss built without ``num_classes``.
        """
        classes = self._resolve_classes(num_classes)
        steps = np.asarray(step)
        if steps.ndim == 0:
            return np.ones(classes)
        return np.ones((steps.size, classes))

    def _resolve_classes(self, num_classes: int | None) -> int:
        """Return C from the loss, checked against the outputs' column count when given."""
        if self.num_classes is None:
            if num_classes is None:
                raise ValueError(
                    f"loss {self.name!r} was built without num_classes: pass num_classes"
                )
            return num_classes
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"outputs have {num_classes} columns but the loss was built for "
                f"{self.num_classes} classes: build the loss with num_classes={num_classes}"
            )
        return self.num_classes

    def static(self) -> ClassificationLoss:
        """Return the static counterpart of this loss (itself for a static loss)."""
        return self

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


class CrossEntropy(ClassificationLoss):
    """Cross-entropy of the logits, averaged over the samples."""

    name = "ce"


class MSE(ClassificationLoss):
    """Squared distance of the outputs to the one-hot targets, summed over outputs, averaged
    over samples."""

    name = "mse"


class _DynamicalLoss(ClassificationLoss):
    """A loss whose class weights follow `gamma` with fixed schedule options."""

    def __init__(
        self,
        num_classes: int,
        amplitude: float,
        period: int,
        schedule: Schedule = "triangle",
        static_tail: int = 0,
        total_steps: int | None = None,
        class_order: str = "sequential",
        seed: int = 0,
    ) -> None:
        super().__init__(num_classes)
        _check_schedule_options(num_classes, amplitude, period, schedule, class_order, seed)
        if static_tail > 0 and total_steps is None:
            raise ValueError(
                "missing total_steps: static_tail > 0 needs the length of the run; pass total_steps"
            )
        self.amplitude = float(amplitude)
        self.period = period
        self.schedule = schedule
        self.static_tail = static_tail
        self.total_steps = total_steps
        self.class_order = class_order
        self.seed = seed

    def gamma_at(self, step: int | np.ndarray, num_classes: int | None = None) -> np.ndarray:
        """Return the class weights at a step, (C,), or at an array of S steps, (S, C)."""
        return gamma(
            step,
            self._resolve_classes(num_classes),
            self.amplitude,
            self.period,
            schedule=self.schedule,
            static_tail=self.static_tail,
            total_steps=self.total_steps,
            class_order=self.class_order,
            seed=self.seed,
        )

    def extra_repr(self) -> str:
        schedule = getattr(self.schedule, "__name__", "callable")
        if isinstance(self.schedule, str):
            schedule = self.schedule
        return (
            f"num_classes={self.num_classes}, amplitude={self.amplitude}, period={self.period}, "
            f"schedule={schedule}, class_order={self.class_order}"
        )


class DynamicalCrossEntropy(_DynamicalLoss):
    """Cross-entropy with sample n weighted by Gamma_{y_n}(t)."""

    name = "dce"

    def static(self) -> ClassificationLoss:
        """Return plain cross-entropy."""
        return CrossEntropy(self.num_classes)


class DynamicalMSE(_DynamicalLoss):
    """Squared error weighted per sample by class (variant 1) or per output channel (variant 2).

    Parameters
    ----------
    variant
        1 for ``dmse1`` (sample n weighted by ``Gamma_{y_n}(t)``), 2 for ``dmse2`` (output k
        weighted by ``Gamma_k(t)``). The other parameters are those of `gamma`.
    """

    def __init__(
        self,
        num_classes: int,
        amplitude: float,
        period: int,
        variant: int = 1,
        schedule: Schedule = "triangle",
        static_tail: int = 0,
        total_steps: int | None = None,
        class_order: str = "sequential",
        seed: int = 0,
    ) -> None:
        if variant not in (1, 2):
            raise ValueError(f"invalid variant {variant!r}: use 1 (per sample) or 2 (per output)")
        super().__init__(
            num_classes, amplitude, period, schedule, static_tail, total_steps, class_order, seed
        )
        self.variant = variant
        self.name = f"dmse{variant}"

    def static(self) -> ClassificationLoss:
        """Return plain MSE."""
        return MSE(self.num_classes)


def make_loss(
    name: str,
    num_classes: int,
    amplitude: float = 1.0,
    period: int = 1,
    schedule: Schedule = "triangle",
    static_tail: int = 0,
    total_steps: int | None = None,
    class_order: str = "sequential",
    seed: int = 0,
) -> ClassificationLoss:
    """Build a loss by name. The schedule options apply to the dynamical losses only.

    Parameters
    ----------
    name
        ``ce``, ``dce``, ``mse``, ``dmse1`` or ``dmse2``.
    num_classes, amplitude, period, schedule, static_tail, total_steps, class_order, seed
        As in `gamma`.

    Returns
    -------
    ClassificationLoss
        The loss module.
    """
    if name == "ce":
        return CrossEntropy(num_classes)
    if name == "mse":
        return MSE(num_classes)
    if name == "dce":
        return DynamicalCrossEntropy(
            num_classes, amplitude, period, schedule, static_tail, total_steps, class_order, seed
        )
    if name in ("dmse1", "dmse2"):
        return DynamicalMSE(
            num_classes,
            amplitude,
            period,
            variant=int(name[-1]),
            schedule=schedule,
            static_tail=static_tail,
            total_steps=total_steps,
            class_order=class_order,
            seed=seed,
        )
    raise ValueError(f"unknown loss {name!r}: use one of {', '.join(LOSSES)}")
