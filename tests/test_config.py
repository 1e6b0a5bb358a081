"""Tests of the record configuration: parsing, coercion and validation messages."""

from __future__ import annotations

import json

import pytest

from dynscope.config import RecordConfig, load_toml


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("lr", -0.1, "invalid lr -0.1"),
        ("lr", float("nan"), "invalid lr nan"),
        ("amplitude", 0.5, "invalid amplitude 0.5"),
        ("period", 0, "invalid period 0"),
        ("loss", "hinge", "invalid loss 'hinge'"),
        ("width", 0, "invalid width 0"),
        ("classes", 1, "invalid classes 1"),
        ("static_tail", 30_000, "invalid static-tail 30000"),
        ("momentum", 1.0, "invalid momentum 1.0"),
        ("compression", 10, "invalid compression 10"),
        ("device", "tpu", "invalid device 'tpu'"),
        ("activation", "sigmoid", "invalid activation 'sigmoid'"),
        ("seed", 2**64, "invalid seed 18446744073709551616"),
        ("batch_size", 10, "batch-size 10 needs --optimizer sgd"),
    ],
)
def test_validate_names_bad_value(option: str, value: object, message: str) -> None:
    config = RecordConfig().replace(**{option: value})

    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        config.validate()


def test_validate_accepts_defaults() -> None:
    assert RecordConfig().validate() == RecordConfig()


def test_sgd_requires_batch_size() -> None:
    with pytest.raises(ValueError, match="batch-size"):
        RecordConfig(optimizer="sgd").validate()


def test_from_dict_accepts_dashed_names() -> None:
    config = RecordConfig.from_dict({"hessian-every": 5, "static_tail": 10})

    assert config.hessian_every == 5
    assert config.static_tail == 10


def test_from_dict_rejects_unknown_option() -> None:
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        RecordConfig.from_dict({"learning_rate": 0.1})


def test_from_dict_coerces_toml_numbers() -> None:
    config = RecordConfig.from_dict({"lr": 1, "steps": 100.0})

    assert isinstance(config.lr, float)
    assert isinstance(config.steps, int)


def test_from_dict_rejects_wrong_type() -> None:
    with pytest.raises(ValueError, match="invalid width 'wide'"):
        RecordConfig.from_dict({"width": "wide"})


def test_json_round_trip_is_exact() -> None:
    config = RecordConfig(lr=0.37, amplitude=12.5, loss="dmse2", seed=4)

    restored = RecordConfig.from_json(config.to_json())

    assert restored == config
    assert json.loads(config.to_json())["loss"] == "dmse2"


def test_is_dynamical_needs_amplitude_above_one() -> None:
    assert RecordConfig(loss="dce", amplitude=2.0).is_dynamical
    assert not RecordConfig(loss="dce", amplitude=1.0).is_dynamical
    assert not RecordConfig(loss="ce", amplitude=70.0).is_dynamical


def test_load_toml_reads_record_table(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[record]\nlr = 0.5\nloss = "ce"\n')

    assert load_toml(path) == {"lr": 0.5, "loss": "ce"}


def test_load_toml_missing_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="config file not found"):
        load_toml(tmp_path / "absent.toml")


def test_load_toml_invalid_syntax(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("lr = = 1\n")

    with pytest.raises(ValueError, match="invalid TOML"):
        load_toml(path)


def test_eigenvectors_conflict_with_projection() -> None:
    with pytest.raises(ValueError, match="use only one of them"):
        RecordConfig(eigenvectors=2, param_projection=20).validate()


def test_load_toml_rejects_folder(tmp_path) -> None:
    with pytest.raises(ValueError, match="is a folder"):
        load_toml(tmp_path)


def test_ignored_options_listed() -> None:
    config = RecordConfig(loss="ce", amplitude=70.0, dataset="moons", classes=5)

    ignored = config.ignored_options()

    assert len(ignored) == 2
    assert ignored[0].startswith("--amplitude 70.0")
    assert ignored[1].startswith("--classes 5")


def test_defaults_ignore_nothing() -> None:
    assert RecordConfig().ignored_options() == []


def test_load_toml_rejects_two_spellings(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("static-tail = 10\nstatic_tail = 20\n")

    with pytest.raises(ValueError, match="'static-tail' is given twice"):
        load_toml(path)


def test_load_toml_rejects_key_beside_record_table(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("steps = 10\n[record]\nlr = 0.5\n")

    with pytest.raises(ValueError, match="'steps' .* outside the \\[record\\] table"):
        load_toml(path)


def test_load_toml_rejects_study_file(tmp_path) -> None:
    path = tmp_path / "study.toml"
    path.write_text("[record]\nlr = 0.5\n[sweep]\nseed = [0, 1]\n")

    with pytest.raises(ValueError, match="is a study file"):
        load_toml(path)


def test_load_toml_rejects_unknown_table(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[record]\nlr = 0.5\n[other]\nseed = 1\n")

    with pytest.raises(ValueError, match=r"unknown table \[other\]"):
        load_toml(path)


@pytest.mark.parametrize(("name", "value"), [("lr", True), ("momentum", False), ("loss", True)])
def test_from_dict_rejects_booleans(name: str, value: bool) -> None:
    with pytest.raises(ValueError, match=f"invalid {name} {value}"):
        RecordConfig.from_dict({name: value})
