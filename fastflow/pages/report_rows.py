"""The report's rows: FINISHED runs -> per (category, backbone, selection protocol, implementation) the best
configuration, its seeds averaged, with intervals over test images; and the studies' selection fidelity."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from fastflow.core.metrics import OFF_DEFECT, image_auroc_interval, pixel_auroc_interval_of_counts
from fastflow.data.paper import MVTEC_CATEGORIES, paper_numbers
from fastflow.engine.protocol import (LEAK_FREE, PAPER, Protocol, RANKED_METRICS, protocol_for_metric, protocol_named,
                                      ranking_key)
from fastflow.engine.selection import OPTIMISM_KEY, POINTS_KEY, RELIABILITY_KEY, SPEARMAN_KEY
from fastflow.engine.reference import LABEL as REFERENCE_LABEL
from fastflow.pages._format import logged_intervals

METRICS = ("image_auroc", "pixel_auroc", "aupro")
PAPER_COMPARED = ("image_auroc", "pixel_auroc")  # the paper reports no AUPRO


@dataclass
class ReportRow:
    category: str
    backbone: str  # timm name, as tagged on the run
    run_id: str  # the first of `run_ids`
    run_name: str
    ours: dict[str, float]  # metric -> best-epoch value, the mean over the configuration's seeds (absent: not logged)
    epoch: Optional[int] = None  # the first run's selected epoch
    protocol: str = PAPER.name  # Protocol.name of the runs' best-epoch choice
    paper: Optional[dict[str, float]] = field(default=None)  # paper_numbers(category); None outside MVTec AD
    validation: dict[str, float] = field(default_factory=dict)  # val_* metric -> mean value at the selected epochs
    fidelity: dict[str, float] = field(default_factory=dict)  # spearman, optimism (when logged), mean over seeds
    run_ids: list[str] = field(default_factory=list)  # one run per seed of one configuration
    spread: dict[str, float] = field(default_factory=dict)  # metric -> sd over seeds (with 2 seeds or more)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> 95% interval over test images
    implementation: str = ""  # tag `implementation`: "" for this project, else the peer measured here (anomalib)

    @property
    def seeds(self) -> int:
        return max(1, len(self.run_ids))

    def reference(self, metric: str, source: str = "paper") -> Optional[float]:
        """The paper's (or, with source='seed', the seed implementation's) value of `metric`."""
        if self.paper is None or metric not in PAPER_COMPARED:
            return None
        return self.paper[metric if source == "paper" else f"seed_{metric}"]

    def diff(self, metric: str) -> Optional[float]:
        theirs = self.reference(metric)
        return None if theirs is None or metric not in self.ours else self.ours[metric] - theirs


def _order(row: ReportRow) -> tuple:
    mvtec = row.category in MVTEC_CATEGORIES
    return (row.backbone, not mvtec, MVTEC_CATEGORIES.index(row.category) if mvtec else 0, row.category)


def run_protocol(tags: dict) -> Protocol:
    """The protocol a run chose its epoch by: its `selection_metric` tag, else its `selection_protocol` label."""
    if tags.get("selection_metric"):
        return protocol_for_metric(tags["selection_metric"])
    return LEAK_FREE if tags.get("selection_protocol", "").startswith(LEAK_FREE.name) else PAPER


SEED_PARAM = "train.seed"
# Params that do not change what a run computes (where and how fast it runs); data.root: the data_hash tag says it.
NOT_CONFIGURATION = ("tracking.", "train.device", "train.num_threads", "train.cache_dir", "train.cache_max_gb",
                     "train.feature_cache", "data.num_workers", "data.root", "eval.heatmap_images", "eval.batch_size")


def configuration(run) -> tuple:
    """What identifies a run's configuration across seeds: its params other than the seed and the machine's, and its
    data (tag data_hash). A run without params (logged by hand) is a configuration of its own."""
    params = run.data.params
    if SEED_PARAM not in params:
        return ("run", run.info.run_id)
    kept = tuple(sorted((k, v) for k, v in params.items() if k != SEED_PARAM and not k.startswith(NOT_CONFIGURATION)))
    return (run.data.tags.get("data_hash", ""), run.data.tags.get("implementation", ""), kept)


def one_per_seed(runs: list) -> list:
    """The latest run of each seed, in seed order."""
    latest = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        latest[run.data.params.get(SEED_PARAM, run.info.run_id)] = run
    return [latest[seed] for seed in sorted(latest, key=str)]


def _mean_metrics(runs: list, names) -> dict[str, float]:
    return {m: float(np.mean([r.data.metrics[f"best/{m}"] for r in runs])) for m in names
            if all(f"best/{m}" in r.data.metrics for r in runs)}


def best_rows(runs: list) -> list[ReportRow]:
    """MLflow runs -> per (category, backbone, protocol, implementation) the best configuration, its seeds averaged;
    configurations are ranked by their protocol's own metrics (mean over seeds). Runs lacking the tags,
    `best/image_auroc` or their protocol's selection metric are ignored."""
    groups: dict[tuple, dict[tuple, list]] = {}
    for run in runs:
        tags, values = run.data.tags, run.data.metrics
        protocol = run_protocol(tags)
        if ("category" not in tags or "backbone" not in tags or "best/image_auroc" not in values
                or f"best/{protocol.metric}" not in values):
            continue
        key = (tags["category"], tags["backbone"], protocol.name, tags.get("implementation", ""))
        groups.setdefault(key, {}).setdefault(configuration(run), []).append(run)
    rows = []
    for (category, backbone, protocol, implementation), configurations in groups.items():
        chosen = max((one_per_seed(c) for c in configurations.values()),
                     key=lambda seeds: ranking_key(_mean_metrics(seeds, RANKED_METRICS), protocol_named(protocol)))
        first = chosen[0]
        epoch = first.data.metrics.get("best/epoch")
        spread = {m: float(np.std([r.data.metrics[f"best/{m}"] for r in chosen], ddof=1)) for m in METRICS
                  if len(chosen) > 1 and all(f"best/{m}" in r.data.metrics for r in chosen)}
        rows.append(ReportRow(category, backbone, first.info.run_id, first.info.run_name or "",
                              _mean_metrics(chosen, METRICS), None if epoch is None else int(epoch), protocol,
                              paper_numbers(category), _mean_metrics(chosen, LEAK_FREE.ranking),
                              _mean_fidelity(chosen), [r.info.run_id for r in chosen], spread,
                              logged_intervals(first.data.metrics, PAPER_COMPARED) if len(chosen) == 1 else {}, implementation))
    return sorted(rows, key=lambda row: (*_order(row), row.implementation, row.protocol))


def attach_intervals(rows: list[ReportRow], test_scores: Callable[[str], Optional[dict]],
                     pixel_counts: Callable[[str], Optional[tuple]]) -> None:
    """Each row's 95% bootstrap intervals over test images of its mean over seeds, from its runs' per-image test
    scores and binned test pixels (every seed scored on the same resampled images); rows whose runs lack them
    keep what a single run logged."""
    for row in rows:
        scores = [test_scores(run_id) for run_id in row.run_ids]
        if scores and all(s is not None for s in scores) and len({tuple(s["images"]) for s in scores}) == 1:
            row.intervals["image_auroc"] = image_auroc_interval(np.array(scores[0]["labels"]),
                                                                np.array([s["scores"] for s in scores]))
        counts = [pixel_counts(run_id) for run_id in row.run_ids]
        if counts and all(c is not None for c in counts) and len({c[0].shape for c in counts}) == 1:
            row.intervals["pixel_auroc"] = pixel_auroc_interval_of_counts(counts)


FIDELITY_KEYS = (("spearman", SPEARMAN_KEY), ("optimism", OPTIMISM_KEY), ("points", POINTS_KEY),
                 ("test_reliability", RELIABILITY_KEY), ("off_defect", f"best/{OFF_DEFECT}"))


def _fidelity(values: dict) -> dict[str, float]:
    return {name: values[key] for name, key in FIDELITY_KEYS if key in values}


def _mean_fidelity(runs: list) -> dict[str, float]:
    return {name: float(np.mean([r.data.metrics[key] for r in runs])) for name, key in FIDELITY_KEYS
            if all(key in r.data.metrics for r in runs)}


REFERENCE_METRICS = {**{m: f"reference/{m}" for m in METRICS}, "off_defect": f"reference/{OFF_DEFECT}"}


def reference_rows(rows: list[ReportRow], runs: list) -> list[ReportRow]:
    """One row "kNN on the same features" per (category, backbone) of this project's rows: the `reference/*` metrics
    of the runs of its leak-free row (else its first row), mean ± sd over their seeds, with the logged interval of a
    single seed. Leak-free by construction (no training, no test label in any choice)."""
    by_id = {run.info.run_id: run for run in runs}
    found: dict[tuple, ReportRow] = {}
    for row in sorted(rows, key=lambda r: r.protocol != LEAK_FREE.name):
        measured = [by_id[i] for i in row.run_ids if i in by_id and REFERENCE_METRICS["image_auroc"] in
                    by_id[i].data.metrics]
        if row.implementation or not measured or (row.category, row.backbone) in found:
            continue
        values = {name: [r.data.metrics[key] for r in measured if key in r.data.metrics]
                  for name, key in REFERENCE_METRICS.items()}
        found[(row.category, row.backbone)] = ReportRow(
            row.category, row.backbone, measured[0].info.run_id, measured[0].info.run_name or "",
            {m: float(np.mean(values[m])) for m in METRICS if values[m]}, None, LEAK_FREE.name, row.paper,
            fidelity={"off_defect": float(np.mean(values["off_defect"]))} if values["off_defect"] else {},
            run_ids=[r.info.run_id for r in measured],
            spread={m: float(np.std(values[m], ddof=1)) for m in METRICS if len(values[m]) > 1},
            intervals=logged_intervals(measured[0].data.metrics, PAPER_COMPARED, "reference/") if len(measured) == 1
            else {}, implementation=REFERENCE_LABEL)
    return list(found.values())


@dataclass
class StudyRow:
    study: str
    category: str
    protocol: str  # the study's selection protocol label
    fidelity: dict[str, float]


def study_rows(runs: list) -> list[StudyRow]:
    """Study parent runs (tag role=study) that logged a selection fidelity across their trials."""
    rows = [StudyRow(run.data.tags.get("study", run.info.run_name or ""), run.data.tags.get("category", ""),
                     run.data.tags.get("selection_protocol", ""), _fidelity(run.data.metrics))
            for run in runs if run.data.tags.get("role") == "study" and POINTS_KEY in run.data.metrics]
    return sorted(rows, key=lambda r: (r.category, r.study))
