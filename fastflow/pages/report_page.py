"""`fastflow report`: our best configuration per (category, backbone) against the paper and the peers ->
reports/paper_gap.{md,html,png}.

Reads FINISHED runs tagged `category` and `backbone` with `best/image_auroc` from MLflow. Runs identical but for
`train.seed` are one configuration; per (category, backbone, selection protocol, implementation) the configuration
whose seeds rank best on average by that protocol's own metrics (fastflow.protocol: leak-free rows by the
validation metrics, test-set rows by the test metrics) is reported: its figures averaged over seeds, with their
spread and a 95% bootstrap interval over test images (fastflow.metrics, from each run's per-image test scores and
binned test pixels). They are compared with the paper's CaiT per-category numbers, the seed implementation's and
anomalib's published ones (fastflow/paper.py). Each row also shows its validation figures and selection fidelity
(fastflow.selection), and studies get a table of their fidelity across trials. The files are also logged to a run
named `report`.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .metrics import OFF_DEFECT, image_auroc_interval, interval_keys, pixel_auroc_interval_of_counts
from .paper import MVTEC_CATEGORIES, PAPER_MEANS, anomalib_best, paper_numbers
from .protocol import LEAK_FREE, PAPER, RANKED_METRICS, Protocol, protocol_for_metric, protocol_named, ranking_key
from .selection import OPTIMISM_KEY, POINTS_KEY, RELIABILITY_KEY, SPEARMAN_KEY

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "pixel_auroc", "aupro")
LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}
PAPER_COMPARED = ("image_auroc", "pixel_auroc")  # the paper reports no AUPRO
PRESET_OF_BACKBONE = {"resnet18": "resnet18", "wide_resnet50_2": "wide_resnet50_2",
                      "deit_base_distilled_patch16_384": "deit", "cait_m48_448": "cait"}
FILES = ("paper_gap.md", "paper_gap.html", "paper_gap.png")


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


@dataclass
class ReportResult:
    rows: list[ReportRow]
    files: list[Path]
    run_id: str = ""  # the MLflow `report` run ("" when not logged)


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
                              _logged_intervals(first) if len(chosen) == 1 else {}, implementation))
    return sorted(rows, key=lambda row: (*_order(row), row.implementation, row.protocol))


def _logged_intervals(run) -> dict[str, tuple[float, float]]:
    """The intervals a run logged at its best epoch (`best/<metric>_ci_low/high`)."""
    found = {}
    for metric in PAPER_COMPARED:
        low, high = (f"best/{k}" for k in interval_keys(metric))
        if low in run.data.metrics and high in run.data.metrics:
            found[metric] = (run.data.metrics[low], run.data.metrics[high])
    return found


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


def fidelity_cells(row: ReportRow) -> list[str]:
    """val image AUROC, val pixel AUROC, Spearman, optimism, test split-half reliability, off-defect image AUROC."""
    return [_fmt(row.validation.get("val_image_auroc")), _fmt(row.validation.get("val_pixel_auroc")),
            _fmt(row.fidelity.get("spearman"), signed=True), _fmt(row.fidelity.get("optimism")),
            _fmt(row.fidelity.get("test_reliability"), signed=True), _fmt(row.fidelity.get("off_defect"))]


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


STUDY_HEADER = ["study", "category", "selection", "complete trials", "Spearman(val, test)", "optimism",
                "test reliability"]


def study_cells(row: StudyRow) -> list[str]:
    points = row.fidelity.get("points")
    return [row.study, row.category, row.protocol, "-" if points is None else str(int(points)),
            _fmt(row.fidelity.get("spearman"), signed=True), _fmt(row.fidelity.get("optimism")),
            _fmt(row.fidelity.get("test_reliability"), signed=True)]


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _mean(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def measured(row: ReportRow, metric: str) -> str:
    """`mean ± sd over seeds [95% interval over test images]`, each part where it is known."""
    text = _fmt(row.ours.get(metric))
    if metric in row.spread:
        text += f" ± {row.spread[metric]:.3f}"
    if metric in row.intervals:
        low, high = row.intervals[metric]
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def _anomalib(row: ReportRow, metric: str) -> str:
    best = anomalib_best(row.category, metric)
    return "-" if best is None else f"{best[0]:.3f} ({best[1]})"


def _who(row: ReportRow) -> str:
    return row.backbone + (f" ({row.implementation}, measured here)" if row.implementation else "")


def _runs(row: ReportRow) -> str:
    return row.run_id[:8] + (f" +{row.seeds - 1}" if row.seeds > 1 else "")


def mvtec_cells(row: ReportRow) -> list[str]:
    cells = [row.category, _who(row), str(row.seeds)]
    for metric in PAPER_COMPARED:
        cells += [measured(row, metric), _fmt(row.reference(metric)), _fmt(row.reference(metric, "seed")),
                  _anomalib(row, metric), _fmt(row.diff(metric), signed=True)]
    return cells + [measured(row, "aupro"), *fidelity_cells(row), str(row.epoch if row.epoch is not None else "-"),
                    row.protocol, _runs(row)]


def mean_cells(backbone: str, rows: list[ReportRow]) -> list[str]:
    cells = [f"mean ({len(rows)})", backbone, ""]
    for metric in PAPER_COMPARED:
        cells += [_fmt(_mean([r.ours.get(metric) for r in rows])),
                  _fmt(_mean([r.reference(metric) for r in rows])),
                  _fmt(_mean([r.reference(metric, "seed") for r in rows])), "",
                  _fmt(_mean([r.diff(metric) for r in rows]), signed=True)]
    blank = [""] * (len(FIDELITY_HEADER) + 1)  # fidelity and epoch are per run
    return cells + [_fmt(_mean([r.ours.get("aupro") for r in rows])), *blank, rows[0].protocol, ""]


FIDELITY_HEADER = ["val image AUROC", "val pixel AUROC", "Spearman", "optimism", "test reliability",
                   "off-defect image AUROC"]
MVTEC_HEADER = ["category", "backbone", "seeds", "image AUROC", "paper", "seed", "anomalib", "diff", "pixel AUROC",
                "paper", "seed", "anomalib", "diff", "AUPRO", *FIDELITY_HEADER, "epoch", "selection", "runs"]
OTHER_HEADER = ["category", "backbone", "seeds", "image AUROC", "pixel AUROC", "AUPRO", *FIDELITY_HEADER, "epoch",
                "selection", "runs"]


def other_cells(row: ReportRow) -> list[str]:
    return [row.category, _who(row), str(row.seeds), *(measured(row, m) for m in METRICS), *fidelity_cells(row),
            str(row.epoch if row.epoch is not None else "-"), row.protocol, _runs(row)]


def tables(rows: list[ReportRow]) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """(MVTec AD rows incl. one mean row per backbone, other-category rows, notes on the paper's backbone means)."""
    mvtec, notes = [], []
    for backbone in sorted({r.backbone for r in rows if r.paper is not None}):
        for who, protocol in sorted({(r.implementation, r.protocol) for r in rows
                                     if r.backbone == backbone and r.paper is not None}):
            group = [r for r in rows if r.backbone == backbone and r.paper is not None and r.protocol == protocol
                     and r.implementation == who]
            mvtec += [mvtec_cells(r) for r in group] + [mean_cells(_who(group[0]), group)]
        preset = PRESET_OF_BACKBONE.get(backbone)
        if preset in PAPER_MEANS:
            image, pixel = PAPER_MEANS[preset]
            notes.append(f"The paper's {preset} means over all 15 categories: image AUROC {_fmt(image)}, "
                         f"pixel AUROC {_fmt(pixel)}.")
    others = [other_cells(r) for r in rows if r.paper is None]
    return mvtec, others, notes


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


INTRO = ("Best configuration of FINISHED runs per (category, backbone, selection protocol) in MLflow experiment `{experiment}`, each "
         "chosen by its own protocol: " + LEAK_FREE.name + " rows (" + LEAK_FREE.label + ") by best/"
         + ", then ".join(LEAK_FREE.ranking) + "; " + PAPER.name + " rows (" + PAPER.label + ") by best/"
         + ", then ".join(PAPER.ranking) + ". Image/pixel AUROC and AUPRO are test-set values at the run's selected "
         "epoch (for " + LEAK_FREE.name + " rows, what a user will see on new parts; for " + PAPER.name + " rows, "
         "optimistic by construction); val = held-out normals + synthetic anomalies at that epoch. Spearman = rank "
         "correlation of the validation and test image AUROC across the run's evaluated epochs (near 1: the "
         "validation score orders epochs as the test set does); optimism = test image AUROC of the test-best epoch "
         "minus that of the selected one; test reliability = Spearman of the epochs' test image AUROC between two halves "
         "of the test set (near 0 or below: the test set cannot rank the epochs, so Spearman is noise); off-defect "
         "image AUROC = the test image AUROC with each defective image scored with its defect region (mask grown "
         "by 1/16 of the side) left out, a diagnostic: near the image AUROC, the score ranks the test images by "
         "something off their defects (lighting, texture), not by the defects. "
         "paper = FastFlow (arXiv 2111.07677) with CaiT, per category, whatever our "
         "backbone; seed = the seed implementation (CaiT); anomalib = the best of anomalib's published FastFlow "
         "numbers for the category (its backbone in brackets; seed 0, early stopping on the test set). diff = ours − "
         "paper. The paper reports no AUPRO. Each row is one configuration: its seeds (runs identical but for "
         "train.seed) are averaged; a figure reads mean ± sd over seeds [95% bootstrap interval over test images of "
         "that mean: normal and defective images resampled separately, every seed scored on the same resample]. "
         "Rows measured here with a peer implementation name it.")
STUDIES_INTRO = ("Selection fidelity of each study across its complete trials: Spearman of the trials' validation "
                 "and test image AUROC; optimism = best test image AUROC among the trials minus the chosen trial's; "
                 "test reliability = Spearman of the trials' test image AUROC between two halves of the test set.")


def markdown(rows: list[ReportRow], experiment: str, generated: str, studies: Optional[list[StudyRow]] = None) -> str:
    mvtec, others, notes = tables(rows)
    parts = ["# FastFlow: our results vs the paper", "", f"Generated {generated}. " + INTRO.format(experiment=experiment),
             "", "## MVTec AD", ""]
    parts += [_markdown_table(MVTEC_HEADER, mvtec) if mvtec else "No MVTec AD category has a finished run yet."]
    parts += ([""] + notes if notes else []) + (["", "![gaps](paper_gap.png)"] if mvtec else [])
    if others:
        parts += ["", "## Other categories (not in MVTec AD; no paper numbers)", "", _markdown_table(OTHER_HEADER, others)]
    if studies:
        parts += ["", "## Studies: selection fidelity", "", STUDIES_INTRO, "",
                  _markdown_table(STUDY_HEADER, [study_cells(s) for s in studies])]
    return "\n".join(parts) + "\n"


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = []
    for cells in body:
        tds = []
        for index, cell in enumerate(cells):
            kind = ""
            if header[index] == "diff" and cell not in ("-", ""):
                kind = ' class="worse"' if cell.startswith("-") else ' class="better"'
            tds.append(f"<td{kind}>{html.escape(cell)}</td>")
        style = ' class="mean"' if cells[0].startswith("mean (") else ""
        lines.append(f"<tr{style}>{''.join(tds)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
         "th{background:#eee}.better{color:#070}.worse{color:#b00}.mean{font-weight:bold;background:#f6f6f6}")


def html_page(rows: list[ReportRow], experiment: str, generated: str, chart_png: bytes,
              studies: Optional[list[StudyRow]] = None) -> str:
    mvtec, others, notes = tables(rows)
    body = [f"<h1>FastFlow: our results vs the paper</h1><p>Generated {html.escape(generated)}. "
            f"{html.escape(INTRO.format(experiment=experiment))}</p><h2>MVTec AD</h2>"]
    body.append(_html_table(MVTEC_HEADER, mvtec) if mvtec else "<p>No MVTec AD category has a finished run yet.</p>")
    body += [f"<p>{html.escape(note)}</p>" for note in notes]
    if mvtec:
        encoded = base64.b64encode(chart_png).decode()
        body.append(f'<p><a href="paper_gap.png"><img alt="gaps to the paper" src="data:image/png;base64,{encoded}">'
                    "</a></p>")
    if others:
        body += ["<h2>Other categories (not in MVTec AD; no paper numbers)</h2>", _html_table(OTHER_HEADER, others)]
    if studies:
        body += ["<h2>Studies: selection fidelity</h2>", f"<p>{html.escape(STUDIES_INTRO)}</p>",
                 _html_table(STUDY_HEADER, [study_cells(s) for s in studies])]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>FastFlow paper gap</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def gap_chart(rows: list[ReportRow]) -> bytes:
    """PNG: per backbone, bars of ours − paper (image and pixel AUROC) for each MVTec AD category."""
    from .visualize import plt

    compared = [r for r in rows if r.paper is not None]
    backbones = sorted({r.backbone for r in compared})
    widest = max([sum(r.backbone == b for r in compared) for b in backbones] or [1])
    figure, axes = plt.subplots(max(1, len(backbones)), 1, squeeze=False,
                                figsize=(max(6.0, 0.7 * widest + 2), 3.2 * max(1, len(backbones))))
    if not backbones:
        axes[0][0].text(0.5, 0.5, "no MVTec AD category to compare", ha="center", va="center")
        axes[0][0].set_axis_off()
    for axis, backbone in zip(axes[:, 0], backbones):
        group = [r for r in compared if r.backbone == backbone]
        both = len({r.protocol for r in group}) > 1
        positions = list(range(len(group)))
        for offset, metric in ((-0.2, "image_auroc"), (0.2, "pixel_auroc")):
            values = [r.diff(metric) if r.diff(metric) is not None else 0.0 for r in group]
            axis.bar([p + offset for p in positions], values, width=0.4, label=LABELS[metric])
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xlim(-0.8, max(len(group), 4) - 0.2)  # a lone category keeps narrow bars
        axis.set_xticks(positions, [f"{r.category} ({r.protocol})" if both else r.category for r in group],
                        rotation=30, ha="right")
        axis.set_ylabel("ours − paper")
        axis.set_title(f"{backbone} vs paper (CaiT)")
        axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def summary_metrics(rows: list[ReportRow]) -> dict[str, float]:
    """Mean gaps per backbone, logged on the `report` run."""
    metrics: dict[str, float] = {"report/rows": float(len(rows))}
    for backbone in sorted({r.backbone for r in rows if r.paper is not None}):
        for protocol in sorted({r.protocol for r in rows if r.backbone == backbone and r.paper is not None}):
            group = [r for r in rows if r.backbone == backbone and r.paper is not None and r.protocol == protocol]
            prefix = f"report/{backbone}/" if protocol == PAPER.name else f"report/{backbone}/{protocol}/"
            for metric in PAPER_COMPARED:
                gap = _mean([r.diff(metric) for r in group])
                if gap is not None:
                    metrics[f"{prefix}mean_{metric}_gap"] = gap
    return metrics


def write_report(experiment: str = "fastflow", out: Path = Path("reports"), uri: str = "",
                 log_to_mlflow: bool = True) -> ReportResult:
    """Write paper_gap.md/.html/.png into `out` from the experiment's runs; log them to a `report` run."""
    from .tracking import finished_runs, log_report_run, read_pixel_counts, read_test_scores

    runs = finished_runs(experiment, uri=uri)
    rows, studies = best_rows(runs), study_rows(runs)
    attach_intervals(rows, read_test_scores, read_pixel_counts)
    if not rows:
        raise LookupError(f"no FINISHED run tagged category and backbone with best/image_auroc in experiment "
                          f"'{experiment}'; train or sweep first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    chart = gap_chart(rows)
    (out / "paper_gap.png").write_bytes(chart)
    (out / "paper_gap.md").write_text(markdown(rows, experiment, generated, studies))
    (out / "paper_gap.html").write_text(html_page(rows, experiment, generated, chart, studies))
    files = [out / name for name in FILES]
    run_id = log_report_run(experiment, files, summary_metrics(rows), uri) if log_to_mlflow else ""
    log.info("report: %d rows -> %s (run %s)", len(rows), out, run_id)
    return ReportResult(rows, files, run_id)


__all__ = ["write_report", "best_rows", "study_rows", "markdown", "ReportRow", "ReportResult", "StudyRow"]
