"""What a study ends with: the best trial by its protocol, selection fidelity across trials, the study's figures,
page and run descriptions, and the terminal's summary table."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from fastflow.core.metrics import image_auroc_interval
from fastflow.data.paper import paper_numbers
from fastflow.engine.protocol import Protocol, protocol_for_metric, ranking_key
from fastflow.engine.selection import Fidelity, fidelity, fidelity_line, split_half_reliability
from fastflow.pages.model_card import run_link
from fastflow.pages.study_note import Champion, study_description, terminal_summary, trial_description
from fastflow.pages.study_page import TrialRow, figure_png, render_study_page, trial_rows
from fastflow.pages.visualize import tidy_study_figure
from fastflow.study.storage import SweepSettings
from fastflow.tracking.logger import BEST_HEATMAPS
from fastflow.tracking.registry import Promotion
from fastflow.tracking.results import child_run_summaries, read_artifact, read_test_scores
from fastflow.tracking.runs import get_run, set_descriptions
from fastflow.tracking.store import server_url

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    study_name: str
    parent_run_id: str
    best_trial: Optional[FrozenTrial]
    counts: dict[str, int]
    promotion: Optional[Promotion] = None
    fidelity: Optional[Fidelity] = None  # validation vs test image AUROC across the complete trials
    rows: list[TrialRow] = field(default_factory=list)  # every trial, best first (`study_page.trial_rows`)


def complete_count(rows: list[TrialRow]) -> int:
    """The one count of complete trials: the terminal summary, the fidelity line and the run descriptions."""
    return sum(row.state == "complete" for row in rows)


def study_fidelity_line(study_fidelity: Optional[Fidelity], rows: list[TrialRow]) -> str:
    """The fidelity line of a study, counted against its complete trials (`complete_count`)."""
    complete = complete_count(rows)
    if study_fidelity is None or study_fidelity.points == complete:
        return fidelity_line(study_fidelity, "complete trials")
    return fidelity_line(study_fidelity, f"of the {complete} complete trials (those with validation and test scores)")


def describe_runs(settings: SweepSettings, parent_run_id: str, rows: list[TrialRow],
                  promotion: Optional[Promotion] = None, study_fidelity: Optional[Fidelity] = None) -> None:
    """The descriptions MLflow shows atop each Overview: the parent run's (ranked trials with links, champion and
    how to load it) and each trial's (rank, objective, state, best epoch). A view: failures are only logged."""
    champion = (Champion(promotion.name, promotion.version, promotion.promoted, promotion.champion)
                if promotion is not None else None)
    try:
        experiment_id = get_run(parent_run_id).info.experiment_id
        parent_link = run_link(experiment_id, parent_run_id)
        study_name, protocol = settings.resolved_study_name(), settings.protocol
        complete = complete_count(rows)
        notes = {row.run_id: trial_description(row, protocol, complete, study_name, parent_link, champion)
                 for row in rows if row.run_id}
        notes[parent_run_id] = study_description(study_name, settings.category, protocol, rows, experiment_id,
                                                 parent_run_id, champion, study_fidelity_line(study_fidelity, rows))
        set_descriptions(notes)
    except Exception as error:
        log.warning("run descriptions not written: %s: %s", type(error).__name__, error)


def trial_rank(trial: FrozenTrial, protocol: Protocol) -> tuple[float, ...]:
    """The objective, then the protocol's tie-breaking metrics (stored on the trial); larger is better."""
    return ranking_key({**trial.user_attrs, protocol.metric: trial.value}, protocol)


def best_trial(trials: Sequence[FrozenTrial], protocol: Protocol) -> Optional[FrozenTrial]:
    """The best complete trial of `trials` by `protocol.ranking`; among exact ties the earliest."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: trial_rank(t, protocol)) if complete else None


def trial_fidelity(trials: Sequence[FrozenTrial], protocol: Protocol) -> Optional[Fidelity]:
    """Validation vs test image AUROC (each at its trial's selected epoch) across the complete trials, the
    selected trial being the study's best, and how reliably the test set ranks those trials (from each trial's
    per-image test scores). None when the trials have no validation score."""
    best = best_trial(trials, protocol)
    rows = [t for t in trials if t.state == TrialState.COMPLETE
            and "val_image_auroc" in t.user_attrs and "image_auroc" in t.user_attrs]
    if best is None or best not in rows:
        return None
    figures = fidelity([t.user_attrs["val_image_auroc"] for t in rows], [t.user_attrs["image_auroc"] for t in rows],
                       rows.index(best))
    scores = [read_test_scores(t.user_attrs["mlflow_run_id"]) for t in rows]
    if any(s is None for s in scores) or len({tuple(s["images"]) for s in scores}) != 1:
        return figures  # a trial without per-image scores, or on other test images: no reliability
    return replace(figures, test_reliability=split_half_reliability(scores[0]["labels"], [s["scores"] for s in scores]))


def study_figures(study: optuna.Study, protocol: Protocol) -> dict:
    """Optimization history, parameter importance and parallel coordinates (those computable now)."""
    from optuna.visualization import matplotlib as plots

    figures = {}
    for name, plot in (("optimization_history", plots.plot_optimization_history),
                       ("param_importances", plots.plot_param_importances),
                       ("parallel_coordinate", plots.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                target = f"{protocol.metric} ({protocol.name})"
                figures[f"{name}.png"] = tidy_study_figure(name, plot(study, target_name=target), protocol.label, target)
        except Exception as error:  # e.g. importance needs >= 2 complete trials with varied params
            log.info("skipping %s: %s", name, error)
    return figures


def study_rows(trials: Sequence[FrozenTrial], protocol: Protocol, parent_run_id: str) -> list[TrialRow]:
    """Every trial with its run's figures and intervals, best first. A complete run logged before intervals were
    gets its test image AUROC's interval from its per-image test scores (`test_scores.json`), when it has them."""
    rows = trial_rows(trials, child_run_summaries(parent_run_id), protocol)
    for row in rows:
        if row.state == "complete" and row.run_id and "image_auroc" not in row.intervals:
            scores = read_test_scores(row.run_id)
            try:
                row.intervals["image_auroc"] = image_auroc_interval(scores["labels"], scores["scores"])
            except (TypeError, KeyError, ValueError):  # no scores, or a single class
                continue
    return rows


def study_page(study: optuna.Study, trials: Sequence[FrozenTrial], settings: SweepSettings, figures: dict,
               rows: list[TrialRow]) -> str:
    """The HTML study page for the parent run: trials ranked, their runs, the champion's heatmaps, the figures."""
    best = best_trial(trials, settings.protocol)
    heatmaps = read_artifact(best.user_attrs["mlflow_run_id"], BEST_HEATMAPS) if best is not None else None
    return render_study_page(study.study_name, settings.category, settings.protocol, rows,
                             best.number if best is not None else None, heatmaps,
                             {name: figure_png(figure) for name, figure in figures.items()}, server_url())


def best_trial_metrics(trials: Sequence[FrozenTrial], protocol: Protocol) -> dict[str, float]:
    best = best_trial(trials, protocol)
    if best is None:
        return {}
    values = {f"best/{k}": v for k, v in best.user_attrs.items() if isinstance(v, float)}
    return {**values, f"best/{protocol.metric}": best.value, "best/trial_number": best.number}


def state_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def no_trial_completed(result: SweepResult) -> str:
    """Why a study has no complete trial, in one line: its trials' states and the first failed trial's error."""
    failed = next((row for row in result.rows if row.state == "failed" and row.note), None)
    states = [row.state for row in result.rows]
    counts = ", ".join(f"{states.count(state)} {state}" for state in sorted(set(states))) or "no trials"
    return (f"no trial of study {result.study_name} completed ({counts})"
            + (f"; trial #{failed.number}: {failed.note}" if failed else "") + "; nothing was registered")


def summary_table(result: SweepResult, category: str, metric: str) -> str:
    """Plain-text table for the terminal: best params and figures (AUROCs with intervals), the paper's numbers."""
    return terminal_summary(result.study_name, result.rows, protocol_for_metric(metric), paper_numbers(category),
                            study_fidelity_line(result.fidelity, result.rows))
