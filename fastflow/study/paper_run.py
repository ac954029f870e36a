"""`fastflow paper`: one backbone preset over MVTec AD categories, resumably, then the paper-gap report.

Per category: one training run with `experiments/<backbone>.yaml` (or, with `trials`, an Optuna sweep of
`sweeps/default.yaml` restricted to that preset). A category is done when the experiment holds a
FINISHED run tagged `paper_backbone=<backbone>` and `category=<category>`; done categories are skipped,
so re-running the same command continues where it stopped. A failing category is recorded and the
others still run. `overrides` (`section.key=value`, as `--set`) apply to every run (e.g. fewer epochs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import yaml

from fastflow.data.paper import MVTEC_CATEGORIES
from fastflow.data.synthetic import SYNTHETIC_CATEGORY
from fastflow.runtime.config import RunConfig, load_config, parse_yaml, read_yaml
from fastflow.study.report import ReportResult, write_report

log = logging.getLogger(__name__)

PAPER_TAG = "paper_backbone"
PROJECT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PaperSettings:
    backbone: str  # a preset: experiments/<backbone>.yaml
    root: str
    categories: tuple[str, ...] = ()  # (): the MVTec AD categories under root, else every category there
    trials: int = 0  # 0: one training run per category; > 0: an Optuna sweep of that many trials
    overrides: tuple[str, ...] = ()  # section.key=value for every run
    space: Path = Path("sweeps/default.yaml")
    report_dir: Path = Path("reports")
    workers: int = 1


@dataclass
class PaperResult:
    categories: list[str]
    done: list[str] = field(default_factory=list)  # trained or swept by this call
    skipped: list[str] = field(default_factory=list)  # already done before
    failed: dict[str, str] = field(default_factory=dict)  # category -> error
    report: Optional[ReportResult] = None


def project_file(path: Path) -> Path:
    """`path` relative to the working directory, else to this project (so the command runs from anywhere)."""
    path = Path(path)
    return path if path.is_absolute() or path.exists() else PROJECT / path


def preset_path(backbone: str) -> Path:
    path = project_file(Path("experiments") / f"{backbone}.yaml")
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise ValueError(f"unknown backbone preset '{backbone}'; known: {', '.join(known) or 'none'} (experiments/*.yaml)")
    return path


def find_categories(root: str, requested: tuple[str, ...]) -> list[str]:
    """The requested categories (checked to exist), else the MVTec AD ones under `root`, else all there."""
    folder = Path(root)
    present = sorted(p.name for p in folder.iterdir() if (p / "train").is_dir()) if folder.is_dir() else []
    if requested:
        missing = [c for c in requested if c not in present and c != SYNTHETIC_CATEGORY]
        if missing:
            raise FileNotFoundError(f"categor{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)} not found "
                                    f"under {root}; categories found: {', '.join(present) or 'none'}")
        return list(dict.fromkeys(requested))
    if not folder.is_dir():
        raise FileNotFoundError(f"data root not found: {root} (set --root or MVTEC_ROOT; `fastflow download mvtec`)")
    mvtec = [c for c in MVTEC_CATEGORIES if c in present]
    if not (mvtec or present):
        raise FileNotFoundError(f"no categories (folders with train/) under {root}")
    return mvtec or present


def category_config(settings: PaperSettings, category: str) -> RunConfig:
    overrides = [*settings.overrides, f"data.root={settings.root}", f"data.category={category}"]
    return load_config(preset_path(settings.backbone), overrides)


def is_done(cfg: RunConfig, backbone: str, category: str) -> bool:
    from fastflow.tracking.results import finished_runs
    from fastflow.tracking.store import quoted

    query = f"tags.{PAPER_TAG} = {quoted(backbone)} and tags.category = {quoted(category)}"
    return bool(finished_runs(cfg.tracking.experiment, query, cfg.tracking.uri))


def train_category(cfg: RunConfig, backbone: str) -> str:
    """One tracked training run with the preset; returns its run id."""
    from fastflow.engine.train import train_and_evaluate
    from fastflow.tracking.runs import start_run

    with start_run(cfg, run_name=f"paper-{backbone}-{cfg.data.category}", tags={PAPER_TAG: backbone}) as tracker:
        train_and_evaluate(cfg, tracker)
    return tracker.run_id


def space_for(settings: PaperSettings) -> Path:
    """The sweep space restricted to the backbone's preset, written to `<report_dir>/spaces/paper-<backbone>.yaml`."""
    raw = read_yaml(project_file(settings.space))
    raw["preset"] = {"type": "categorical", "choices": [settings.backbone]}
    raw["presets_dir"] = str(preset_path(settings.backbone).parent)
    path = Path(settings.report_dir) / "spaces" / f"paper-{settings.backbone}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# generated by `fastflow paper` from {settings.space}\n" + yaml.safe_dump(raw, sort_keys=False))
    return path


def fixed_overrides(overrides: tuple[str, ...]) -> dict:
    """`section.key=value` strings -> {'section.key': value} for SweepSettings.extra_fixed."""
    fixed = {}
    for text in overrides:
        key, raw = text.split("=", 1)
        if key.strip() == "tracking.uri":
            raise ValueError("with --trials, point MLflow elsewhere through MLFLOW_TRACKING_URI, not --set tracking.uri")
        fixed[key.strip()] = parse_yaml(raw) if raw.strip() else ""
    return fixed


def _trials(sweep) -> list:
    """The study's trials so far, without creating it (run_sweep must create it, with its parent run)."""
    import optuna

    from fastflow.study.storage import make_storage

    try:
        return optuna.load_study(study_name=sweep.resolved_study_name(), storage=make_storage(sweep)).trials
    except KeyError:
        return []


def sweep_category(settings: PaperSettings, cfg: RunConfig) -> str:
    """Run the trials still missing from the category's study; tag its best trial's run; return that run id."""
    from optuna.trial import TrialState

    from fastflow.study.storage import SweepSettings
    from fastflow.study.sweep import run_sweep
    from fastflow.tracking.logger import MlflowTracker

    sweep = SweepSettings(space_for(settings), cfg.data.category, settings.root, settings.trials, settings.workers,
                          experiment=cfg.tracking.experiment, extra_fixed=fixed_overrides(settings.overrides),
                          promote=False)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = settings.trials - sum(t.state in finished for t in _trials(sweep))
    if remaining > 0:
        run_sweep(replace(sweep, trials=remaining))
    complete = [t for t in _trials(sweep) if t.state == TrialState.COMPLETE and "mlflow_run_id" in t.user_attrs]
    if not complete:
        raise RuntimeError(f"no trial of study {sweep.resolved_study_name()} completed")
    run_id = max(complete, key=lambda t: t.value).user_attrs["mlflow_run_id"]
    MlflowTracker(run_id).set_tags({PAPER_TAG: settings.backbone})
    return run_id


def run_paper(settings: PaperSettings) -> PaperResult:
    """Train or sweep every category not done yet, then regenerate the report from the experiment."""
    from fastflow.tracking.store import ensure_experiment, tracking_uri

    if settings.trials < 0 or settings.workers < 1:
        raise ValueError(f"trials must be >= 0 and workers >= 1; got {settings.trials}, {settings.workers}")
    base = load_config(preset_path(settings.backbone), [*settings.overrides, f"data.root={settings.root}"])
    result = PaperResult(find_categories(settings.root, settings.categories))
    ensure_experiment(base.tracking.experiment, tracking_uri(base.tracking.uri))
    for category in result.categories:
        cfg = category_config(settings, category)
        if is_done(cfg, settings.backbone, category):
            log.info("%s/%s: done before, skipping", settings.backbone, category)
            result.skipped.append(category)
            continue
        log.info("%s/%s: %s", settings.backbone, category,
                 f"sweeping {settings.trials} trials" if settings.trials else "training")
        try:
            run_id = sweep_category(settings, cfg) if settings.trials else train_category(cfg, settings.backbone)
        except Exception as error:  # one failing category does not stop the others; the run is FAILED in MLflow
            log.error("%s/%s failed: %s: %s", settings.backbone, category, type(error).__name__, error)
            result.failed[category] = f"{type(error).__name__}: {error}"
            continue
        log.info("%s/%s: finished run %s", settings.backbone, category, run_id)
        result.done.append(category)
    try:
        result.report = write_report(base.tracking.experiment, settings.report_dir, base.tracking.uri)
    except LookupError:
        if result.failed:
            raise RuntimeError("no category finished: " + "; ".join(f"{c}: {e}" for c, e in result.failed.items()))
        raise
    return result


__all__ = ["run_paper", "PaperSettings", "PaperResult", "find_categories", "PAPER_TAG"]
