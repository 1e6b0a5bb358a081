"""Define the configuration of one record run and check it.

A `RecordConfig` is flat: its field names are the command-line option names with dashes turned
into underscores, so a TOML file, the CLI and the Python API share one vocabulary. Every value is
checked in `RecordConfig.validate`, which raises `ValueError` naming the option and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

LOSSES = ("ce", "dce", "mse", "dmse1", "dmse2")
DYNAMICAL_LOSSES = ("dce", "dmse1", "dmse2")
SCHEDULES = ("triangle", "sine", "square")
CLASS_ORDERS = ("sequential", "random")
ACTIVATIONS = ("relu", "tanh", "gelu", "softplus")
INITS = ("torch", "standard", "glorot")
DTYPES = ("float64", "float32")
OPTIMIZERS = ("gd", "sgd")
SPECTRA = ("full", "topk", "none")
PARAM_DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class RecordConfig:
    """Options of one training run; defaults follow the spiral run of the dynamical-loss papers.

    The defaults (width 100 ReLU, lr 1, A = 70, T = 5000, full spectrum every 25 steps) are the
    spiral setting in which the dynamical cross-entropy shows period-doubling cascades.
    """

    # training length and seed
    steps: int = 20_000
    seed: int = 0

    # data
    dataset: str = "spiral"
    classes: int = 3
    points_per_class: int = 100
    revolutions: float = 4.0
    noise: float = 0.2
    val_fraction: float = 0.25

    # model
    width: int = 100
    depth: int = 1
    activation: str = "relu"
    init: str = "torch"
    dtype: str = "float64"

    # loss and schedule
    loss: str = "dce"
    amplitude: float = 70.0
    period: int = 5000
    schedule: str = "triangle"
    static_tail: int = 0
    class_order: str = "sequential"

    # optimiser
    optimizer: str = "gd"
    lr: float = 1.0
    batch_size: int = 0
    momentum: float = 0.0

    # probes
    hessian_every: int = 25
    spectrum: str = "full"
    topk: int = 10
    eigenvectors: int = 0
    ntk: int = 0
    snapshot_every: int = 100

    # storage
    flush_every: int = 500
    compression: int = 4
    param_projection: int = 0
    param_dtype: str = "float64"

    device: str = "cpu"

    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def validate(self) -> RecordConfig:
        """Check every option and return self; raise ValueError naming the bad value and the fix."""
        _positive_int("steps", self.steps)
        _non_negative_int("seed", self.seed)
        if self.seed >= 2**63:
            raise ValueError(f"invalid seed {self.seed}: use a seed below 2**63")
        _choice_or_path("dataset", self.dataset)
        _int_at_least("classes", self.classes, 2)
        _positive_int("points-per-class", self.points_per_class)
        _finite_positive("revolutions", self.revolutions)
        _finite_non_negative("noise", self.noise)
        if not (0.0 < self.val_fraction < 1.0):
            raise ValueError(
                f"invalid val-fraction {self.val_fraction!r}: use a fraction between 0 and 1"
            )

        _positive_int("width", self.width)
        _non_negative_int("depth", self.depth)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("init", self.init, INITS)
        _choice("dtype", self.dtype, DTYPES)

        _choice("loss", self.loss, LOSSES)
        if not (math.isfinite(self.amplitude) and self.amplitude >= 1.0):
            raise ValueError(
                f"invalid amplitude {self.amplitude!r}: use A >= 1 (A = 1 is the static loss)"
            )
        _positive_int("period", self.period)
        _choice("schedule", self.schedule, SCHEDULES)
        _non_negative_int("static-tail", self.static_tail)
        if self.static_tail > self.steps:
            raise ValueError(
                f"invalid static-tail {self.static_tail}: it exceeds steps ({self.steps}); "
                "use a tail of at most the number of steps"
            )
        _choice("class-order", self.class_order, CLASS_ORDERS)

        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _finite_positive("lr", self.lr)
        _non_negative_int("batch-size", self.batch_size)
        if self.optimizer == "sgd" and self.batch_size == 0:
            raise ValueError("optimizer sgd needs --batch-size: give a mini-batch size above 0")
        if self.optimizer == "gd" and self.batch_size != 0:
            raise ValueError(
                f"batch-size {self.batch_size} needs --optimizer sgd: full-batch gd uses every "
                "training point, so drop --batch-size or choose sgd"
            )
        if not (math.isfinite(self.momentum) and 0.0 <= self.momentum < 1.0):
            raise ValueError(f"invalid momentum {self.momentum!r}: use a value in [0, 1)")

        _non_negative_int("hessian-every", self.hessian_every)
        _choice("spectrum", self.spectrum, SPECTRA)
        _positive_int("topk", self.topk)
        _non_negative_int("eigenvectors", self.eigenvectors)
        _non_negative_int("ntk", self.ntk)
        _non_negative_int("snapshot-every", self.snapshot_every)

        _positive_int("flush-every", self.flush_every)
        if not (isinstance(self.compression, int) and 0 <= self.compression <= 9):
            raise ValueError(
                f"invalid compression {self.compression!r}: use a zlib level from 0 to 9"
            )
        _non_negative_int("param-projection", self.param_projection)
        _choice("param-dtype", self.param_dtype, PARAM_DTYPES)
        if self.eigenvectors and self.param_projection:
            raise ValueError(
                "--eigenvectors stores full-length eigenvectors, which --param-projection does "
                "not project; use only one of them"
            )
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"invalid device {self.device!r}: use cpu, cuda or cuda:N")
        return self

    def ignored_options(self) -> list[str]:
        """List the options that are set but have no effect with the other options chosen."""
        ignored = []
        if self.loss not in DYNAMICAL_LOSSES and self.amplitude != 1.0:
            ignored.append(f"--amplitude {self.amplitude} (loss {self.loss} is static)")
        if self.dataset in ("moons", "circles") and self.classes != 3:
            ignored.append(f"--classes {self.classes} ({self.dataset} always has 2 classes)")
        if self.dataset != "spiral" and self.revolutions != 4.0:
            ignored.append(f"--revolutions {self.revolutions} (only the spiral uses it)")
        return ignored

    @property
    def is_dynamical(self) -> bool:
        """Whether the loss oscillates (a dynamical loss with amplitude above 1)."""
        return self.loss in DYNAMICAL_LOSSES and self.amplitude > 1.0

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a plain dictionary (without `extra`)."""
        values = dataclasses.asdict(self)
        values.pop("extra")
        return values

    def to_json(self) -> str:
        """Serialise the options as one JSON string, the form stored in a record."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RecordConfig:
        """Build a config from option names (dashes or underscores); reject unknown names."""
        known = {f.name for f in fields(cls)} - {"extra"}
        cleaned: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(
                    f"unknown option {key!r}: valid options are "
                    + ", ".join(sorted(n.replace("_", "-") for n in known))
                )
            cleaned[name] = _coerce(name, value)
        return cls(**cleaned)

    @classmethod
    def from_json(cls, text: str) -> RecordConfig:
        """Rebuild a config from the JSON string stored in a record."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> RecordConfig:
        """Return a copy with some options changed."""
        return dataclasses.replace(self, **changes)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read option values from a TOML file: top-level keys or a `[record]` table."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config {path} is a folder; give a TOML file")
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}; check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"invalid TOML in {path}: {error}") from None
    if "record" in document and isinstance(document["record"], dict):
        tables = [key for key, value in document.items() if isinstance(value, dict)]
        if "sweep" in tables:
            raise ValueError(
                f"{path} is a study file ([sweep] table); run it with dynscope sweep, or remove "
                "[sweep] to record one run"
            )
        others = [key for key in tables if key != "record"]
        if others:
            raise ValueError(
                f"unknown table [{others[0]}] in {path}; record options go in the [record] table"
            )
        stray = [key for key, value in document.items() if not isinstance(value, dict)]
        if stray:
            raise ValueError(
                f"option {stray[0]!r} in {path} is outside the [record] table, where it "
                "would be ignored; move it into [record]"
            )
        options = dict(document["record"])
    else:
        options = document
    spellings: dict[str, str] = {}
    for key in options:
        canonical = key.replace("-", "_")
        if canonical in spellings:
            raise ValueError(
                f"option {canonical.replace('_', '-')!r} is given twice in {path} (as "
                f"{spellings[canonical]!r} and {key!r}); keep one of them"
            )
        spellings[canonical] = key
    return options


def _coerce(name: str, value: Any) -> Any:
    """Convert a value read from TOML or JSON to the field's type (ints given as floats, etc.)."""
    default = RecordConfig.__dataclass_fields__[name].default
    if isinstance(value, bool) and not isinstance(default, bool):
        kind = "a string" if isinstance(default, str) else "a number"
        raise ValueError(f"invalid {name.replace('_', '-')} {value!r}: use {kind}")
    if isinstance(default, bool) or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(default, int) and not isinstance(value, int):
        raise ValueError(f"invalid {name.replace('_', '-')} {value!r}: use an integer")
    if isinstance(default, float) and not isinstance(value, (int, float)):
        raise ValueError(f"invalid {name.replace('_', '-')} {value!r}: use a number")
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"invalid {name.replace('_', '-')} {value!r}: use a string")
    return value


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"invalid {name} {value!r}: use one of {', '.join(choices)}")


def _choice_or_path(name: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"invalid {name} {value!r}: give a dataset name or a file path")


def _positive_int(name: str, value: int) -> None:
    _int_at_least(name, value, 1)


def _non_negative_int(name: str, value: int) -> None:
    _int_at_least(name, value, 0)


def _int_at_least(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"invalid {name} {value!r}: use an integer >= {minimum}")


def _finite_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"invalid {name} {value!r}: use a finite number above 0")


def _finite_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"invalid {name} {value!r}: use a finite number >= 0")
