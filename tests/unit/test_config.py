"""Tests for fastflow.config: defaults <- YAML preset <- `--set` overrides, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastflow.runtime.config import (ConfigError, ModelConfig, RunConfig, TrainConfig, config_from_dict, dump_yaml,
                                     flatten, load_config, read_yaml, to_dict, with_overrides)

from conftest import REPO

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def test_defaults_load() -> None:
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.model.backbone == ModelConfig.backbone
    assert cfg.model.feature_indices == (1, 2, 3)
    assert cfg.train.epochs == TrainConfig.epochs and cfg.train.epochs >= 1


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_experiment_file_loads(path: Path) -> None:
    cfg = load_config(path)
    # Whatever the file sets is what we get back (presets hold only what differs).
    for section, values in read_yaml(path).items():
        for key, value in (values or {}).items():
            got = getattr(getattr(cfg, section), key)
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{section}.{key}"


def test_demo_preset_exists() -> None:
    assert (REPO / "experiments" / "demo.yaml") in EXPERIMENTS


def test_set_overrides_are_coerced() -> None:
    cfg = load_config(REPO / "experiments" / "demo.yaml", [
        "train.lr=3.0e-4",  # YAML float
        "train.epochs=7",
        "train.weight_decay=0",  # int -> float
        "model.conv3x3_only=false",
        "model.feature_indices=[2, 3]",
        "model.mean=[0.1, 0.2, 0.3]",
        "data.category=123",  # number -> str
        "model.anomaly_map=nll",
        "tracking.run_name=",  # empty string
    ])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.model.conv3x3_only is False
    assert cfg.model.feature_indices == (2, 3)
    assert cfg.model.mean == (0.1, 0.2, 0.3)
    assert cfg.data.category == "123"
    assert cfg.model.anomaly_map == "nll"
    assert cfg.tracking.run_name == ""
    # the preset's other values survive
    assert cfg.model.backbone == "tf_efficientnet_lite0"
    # a single int becomes a one-element tuple (a transformer block index)
    assert load_config(None, ["model.feature_indices=7"]).model.feature_indices == (7,)


@pytest.mark.parametrize("text", ["3e-4", "1E-3", "2e+1"])
def test_exponent_without_dot_is_a_float(text: str) -> None:
    assert load_config(None, [f"train.lr={text}"]).train.lr == pytest.approx(float(text))


def test_later_override_wins() -> None:
    assert load_config(None, ["train.lr=0.001", "train.lr=0.0005"]).train.lr == pytest.approx(5e-4)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key", [
    ("model:\n  flow_step: 8\n", "model.flow_step"),  # unknown key (gathierry's spelling)
    ("trian:\n  lr: 1.0e-3\n", "trian"),  # unknown section
    ("train:\n  epochs: ten\n", "train.epochs"),  # wrong type
    ("train:\n  epochs: 2.5\n", "train.epochs"),  # float for int
    ("model:\n  conv3x3_only: 1\n", "model.conv3x3_only"),  # int for bool
    ("model:\n  anomaly_map: heat\n", "model.anomaly_map"),  # bad Literal
    ("train:\n  feature_cache: ram\n", "train.feature_cache"),  # bad Literal
    ("model:\n  mean: [0.5, 0.5]\n", "model.mean"),  # wrong length
    ("train:\n  epochs: 0\n", "train.epochs"),  # impossible value
    ("train:\n  epochs: 3\n  warmup_epochs: 3\n", "train.warmup_epochs"),  # impossible combination
    ("data:\n  val_fraction: 1.5\n", "data.val_fraction"),
    ("model:\n  std: [0.5, 0.0, 0.5]\n", "model.std"),
])
def test_bad_file_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert key in message
    assert str(path) in message


def test_bad_literal_lists_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"z2, nll"):
        load_config(_write(tmp_path, "model:\n  anomaly_map: heat\n"))


def test_unknown_key_lists_known_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"flow_steps"):
        load_config(_write(tmp_path, "model:\n  flow_step: 8\n"))


@pytest.mark.parametrize("override, key", [
    ("model.flow_step=8", "model.flow_step"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=abc", "train.epochs"),
    ("train.amp=fp8", "train.amp"),
    ("train.lr=-1", "train.lr"),
])
def test_bad_override_names_key_and_source(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "experiments" / "demo.yaml", [override])
    message = str(info.value)
    assert key in message
    assert "--set" in message and "demo.yaml" in message


@pytest.mark.parametrize("override", ["train.lr", "lr=1e-3", "a.b.c=1"])
def test_malformed_override(override: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, [override])


def test_invalid_yaml_and_non_mapping_name_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Path("nope.yaml"))


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, "train: 5\n")
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        load_config(path)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match="model.flow_steps"):
        RunConfig(model=ModelConfig(flow_steps=0))


def test_with_overrides_validates() -> None:
    cfg = with_overrides(RunConfig(), {"train": {"lr": 1e-4}, "model": {"feature_indices": [2]}})
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.model.feature_indices == (2,)
    with pytest.raises(ConfigError, match="train.epochs"):
        with_overrides(RunConfig(), {"train": {"epochs": 0}})


def test_flatten_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config(REPO / "experiments" / "demo.yaml", ["model.flow_steps=6"])
    flat = flatten(cfg)
    assert flat["model.flow_steps"] == 6
    assert flat["train.lr"] == cfg.train.lr
    assert flat["model.feature_indices"] == [1, 2, 3]
    sections = {"data", "model", "train", "eval", "tracking"}
    assert {key.split(".")[0] for key in flat} == sections
    assert all(key.count(".") == 1 for key in flat)
    # the saved config.yaml reloads to the same config
    path = tmp_path / "config.yaml"
    dump_yaml(cfg, path)
    assert load_config(path) == cfg
    assert config_from_dict(to_dict(cfg)) == cfg


def _enum_values() -> list[tuple[str, str]]:
    """(section.key, value) for every allowed value of every enum (Literal) key of the config."""
    import typing

    pairs = []
    for section, section_type in typing.get_type_hints(RunConfig).items():
        for name, hint in typing.get_type_hints(section_type).items():
            if typing.get_origin(hint) is typing.Literal:
                pairs += [(f"{section}.{name}", value) for value in typing.get_args(hint)]
    return pairs


ENUM_VALUES = _enum_values()


@pytest.mark.parametrize("key, value", ENUM_VALUES, ids=[f"{k}={v}" for k, v in ENUM_VALUES])
def test_every_documented_enum_value_is_accepted(tmp_path: Path, key: str, value: str) -> None:
    """Failed before the fix for `off` (train.amp, train.feature_cache): YAML 1.1 read it as False."""
    extra = ["train.ema_halflife=1"] if key == "eval.weights" else []
    section, name = key.split(".")
    from_set = load_config(None, [f"{key}={value}", *extra])
    path = tmp_path / "preset.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n" + ("train:\n  ema_halflife: 1\n" if extra else ""))
    from_file = load_config(path)
    assert getattr(getattr(from_set, section), name) == value == getattr(getattr(from_file, section), name)


def test_yes_no_on_off_still_set_booleans_and_strings_stay_strings() -> None:
    cfg = load_config(None, ["train.cosine=yes", "tracking.enabled=off", "data.category=no", "tracking.run_name=on"])
    assert cfg.train.cosine is True and cfg.tracking.enabled is False
    assert cfg.data.category == "no" and cfg.tracking.run_name == "on"
