"""`fastflow report`: our best run per (category, backbone) against the paper -> reports/paper_gap.{md,html,png}.

Reads FINISHED runs tagged `category` and `backbone` with `best/image_auroc` from MLflow, keeps the best
per (category, backbone, selection protocol), each chosen by its own protocol's ranking (fastflow.protocol:
leak-free rows by the validation metrics, test-set rows by the test metrics), and compares image AUROC,
pixel AUROC and AUPRO with the paper's CaiT per-category numbers and the seed implementation's
(fastflow/paper.py). Each row also shows its validation figures and selection fidelity (fastflow.selection),
and studies get a table of their fidelity across trials. The files are also logged to a run named `report`.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from .paper import MVTEC_CATEGORIES, PAPER_MEANS, paper_numbers
from .protocol import LEAK_FREE, PAPER, Protocol, protocol_for_metric, ranking_key
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
    run_id: str
    run_name: str
    ours: dict[str, float]  # metric -> best-epoch value (absent when not logged)
    epoch: Optional[int] = None
    protocol: str = PAPER.name  # Protocol.name of the run's best-epoch choice
    paper: Optional[dict[str, float]] = field(default=None)  # paper_numbers(category); None outside MVTec AD
    validation: dict[str, float] = field(default_factory=dict)  # val_* metric -> value at the selected epoch
    fidelity: dict[str, float] = field(default_factory=dict)  # spearman, optimism (when logged)

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


def best_rows(runs: list) -> list[ReportRow]:
    """MLflow runs -> the best run per (category, backbone, protocol), ranked by that protocol's own metrics;
    runs lacking the tags, `best/image_auroc` or their protocol's selection metric are ignored."""
    best: dict[tuple[str, str, str], tuple[tuple[float, ...], object]] = {}
    for run in runs:
        tags, values = run.data.tags, run.data.metrics
        protocol = run_protocol(tags)
        if ("category" not in tags or "backbone" not in tags or "best/image_auroc" not in values
                or f"best/{protocol.metric}" not in values):
            continue
        key = (tags["category"], tags["backbone"], protocol.name)
        rank = ranking_key(values, protocol, "best/")
        if key not in best or rank > best[key][0]:
            best[key] = (rank, run)
    rows = []
    for (category, backbone, protocol), (_, run) in best.items():
        values = run.data.metrics
        epoch = values.get("best/epoch")
        rows.append(ReportRow(category, backbone, run.info.run_id, run.info.run_name or "",
                              {m: values[f"best/{m}"] for m in METRICS if f"best/{m}" in values},
                              None if epoch is None else int(epoch), protocol, paper_numbers(category),
                              {m: values[f"best/{m}"] for m in LEAK_FREE.ranking if f"best/{m}" in values},
                              _fidelity(values)))
    return sorted(rows, key=lambda row: (*_order(row), row.protocol))


def _fidelity(values: dict) -> dict[str, float]:
    return {name: values[key] for name, key in (("spearman", SPEARMAN_KEY), ("optimism", OPTIMISM_KEY),
                                                ("points", POINTS_KEY), ("test_reliability", RELIABILITY_KEY))
            if key in values}


def fidelity_cells(row: ReportRow) -> list[str]:
    """val image AUROC, val pixel AUROC, Spearman, optimism, test split-half reliability."""
    return [_fmt(row.validation.get("val_image_auroc")), _fmt(row.validation.get("val_pixel_auroc")),
            _fmt(row.fidelity.get("spearman"), signed=True), _fmt(row.fidelity.get("optimism")),
            _fmt(row.fidelity.get("test_reliability"), signed=True)]


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


def mvtec_cells(row: ReportRow) -> list[str]:
    cells = [row.category, row.backbone]
    for metric in PAPER_COMPARED:
        cells += [_fmt(row.ours.get(metric)), _fmt(row.reference(metric)), _fmt(row.reference(metric, "seed")),
                  _fmt(row.diff(metric), signed=True)]
    return cells + [_fmt(row.ours.get("aupro")), *fidelity_cells(row), str(row.epoch if row.epoch is not None else "-"),
                    row.protocol, row.run_id[:8]]


def mean_cells(backbone: str, rows: list[ReportRow]) -> list[str]:
    cells = [f"mean ({len(rows)})", backbone]
    for metric in PAPER_COMPARED:
        cells += [_fmt(_mean([r.ours.get(metric) for r in rows])),
                  _fmt(_mean([r.reference(metric) for r in rows])),
                  _fmt(_mean([r.reference(metric, "seed") for r in rows])),
                  _fmt(_mean([r.diff(metric) for r in rows]), signed=True)]
    blank = [""] * (len(FIDELITY_HEADER) + 1)  # fidelity and epoch are per run
    return cells + [_fmt(_mean([r.ours.get("aupro") for r in rows])), *blank, rows[0].protocol, ""]


FIDELITY_HEADER = ["val image AUROC", "val pixel AUROC", "Spearman", "optimism", "test reliability"]
MVTEC_HEADER = ["category", "backbone", "image AUROC", "paper", "seed", "diff", "pixel AUROC", "paper", "seed", "diff",
                "AUPRO", *FIDELITY_HEADER, "epoch", "selection", "run"]
OTHER_HEADER = ["category", "backbone", "image AUROC", "pixel AUROC", "AUPRO", *FIDELITY_HEADER, "epoch", "selection",
                "run"]


def other_cells(row: ReportRow) -> list[str]:
    return [row.category, row.backbone, *(_fmt(row.ours.get(m)) for m in METRICS), *fidelity_cells(row),
            str(row.epoch if row.epoch is not None else "-"), row.protocol, row.run_id[:8]]


def tables(rows: list[ReportRow]) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """(MVTec AD rows incl. one mean row per backbone, other-category rows, notes on the paper's backbone means)."""
    mvtec, notes = [], []
    for backbone in sorted({r.backbone for r in rows if r.paper is not None}):
        for protocol in sorted({r.protocol for r in rows if r.backbone == backbone and r.paper is not None}):
            group = [r for r in rows if r.backbone == backbone and r.paper is not None and r.protocol == protocol]
            mvtec += [mvtec_cells(r) for r in group] + [mean_cells(backbone, group)]
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


INTRO = ("Best FINISHED run per (category, backbone, selection protocol) in MLflow experiment `{experiment}`, each "
         "chosen by its own protocol: " + LEAK_FREE.name + " rows (" + LEAK_FREE.label + ") by best/"
         + ", then ".join(LEAK_FREE.ranking) + "; " + PAPER.name + " rows (" + PAPER.label + ") by best/"
         + ", then ".join(PAPER.ranking) + ". Image/pixel AUROC and AUPRO are test-set values at the run's selected "
         "epoch (for " + LEAK_FREE.name + " rows, what a user will see on new parts; for " + PAPER.name + " rows, "
         "optimistic by construction); val = held-out normals + synthetic anomalies at that epoch. Spearman = rank "
         "correlation of the validation and test image AUROC across the run's evaluated epochs (near 1: the "
         "validation score orders epochs as the test set does); optimism = test image AUROC of the test-best epoch "
         "minus that of the selected one; test reliability = Spearman of the epochs' test image AUROC between two halves "
         "of the test set (near 0 or below: the test set cannot rank the epochs, so Spearman is noise). "
         "paper = FastFlow (arXiv 2111.07677) with CaiT, per category, whatever our "
         "backbone; seed = the seed implementation (CaiT). diff = ours − paper. The paper reports no AUPRO.")
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
    from .tracking import finished_runs, log_report_run

    runs = finished_runs(experiment, uri=uri)
    rows, studies = best_rows(runs), study_rows(runs)
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
