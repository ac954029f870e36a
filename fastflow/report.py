"""`fastflow report`: our best run per (category, backbone) against the paper -> reports/paper_gap.{md,html,png}.

Reads FINISHED runs tagged `category` and `backbone` with `best/image_auroc` from MLflow, keeps the best
per pair (by `best/image_auroc`, then `best/pixel_auroc`), and compares image AUROC, pixel AUROC and
AUPRO with the paper's CaiT per-category numbers and the seed implementation's (fastflow/paper.py).
The files are also logged to a run named `report` in the same experiment.
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
    protocol: str = "test"  # test (paper protocol) | leak-free
    paper: Optional[dict[str, float]] = field(default=None)  # paper_numbers(category); None outside MVTec AD

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


def best_rows(runs: list) -> list[ReportRow]:
    """MLflow runs -> the best run per (category, backbone); runs lacking the tags or `best/image_auroc` are ignored."""
    best: dict[tuple[str, str], tuple[tuple[float, float], object]] = {}
    for run in runs:
        tags, values = run.data.tags, run.data.metrics
        if "category" not in tags or "backbone" not in tags or "best/image_auroc" not in values:
            continue
        key = (tags["category"], tags["backbone"])
        rank = (values["best/image_auroc"], values.get("best/pixel_auroc", float("-inf")))
        if key not in best or rank > best[key][0]:
            best[key] = (rank, run)
    rows = []
    for (category, backbone), (_, run) in best.items():
        values, tags = run.data.metrics, run.data.tags
        epoch = values.get("best/epoch")
        rows.append(ReportRow(category, backbone, run.info.run_id, run.info.run_name or "",
                              {m: values[f"best/{m}"] for m in METRICS if f"best/{m}" in values},
                              None if epoch is None else int(epoch),
                              "leak-free" if tags.get("selection_protocol", "").startswith("leak-free") else "test",
                              paper_numbers(category)))
    return sorted(rows, key=_order)


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
    return cells + [_fmt(row.ours.get("aupro")), str(row.epoch if row.epoch is not None else "-"), row.protocol,
                    row.run_id[:8]]


def mean_cells(backbone: str, rows: list[ReportRow]) -> list[str]:
    cells = [f"mean ({len(rows)})", backbone]
    for metric in PAPER_COMPARED:
        cells += [_fmt(_mean([r.ours.get(metric) for r in rows])),
                  _fmt(_mean([r.reference(metric) for r in rows])),
                  _fmt(_mean([r.reference(metric, "seed") for r in rows])),
                  _fmt(_mean([r.diff(metric) for r in rows]), signed=True)]
    return cells + [_fmt(_mean([r.ours.get("aupro") for r in rows])), "", "", ""]


MVTEC_HEADER = ["category", "backbone", "image AUROC", "paper", "seed", "diff", "pixel AUROC", "paper", "seed", "diff",
                "AUPRO", "epoch", "selection", "run"]
OTHER_HEADER = ["category", "backbone", "image AUROC", "pixel AUROC", "AUPRO", "epoch", "selection", "run"]


def other_cells(row: ReportRow) -> list[str]:
    return [row.category, row.backbone, *(_fmt(row.ours.get(m)) for m in METRICS),
            str(row.epoch if row.epoch is not None else "-"), row.protocol, row.run_id[:8]]


def tables(rows: list[ReportRow]) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """(MVTec AD rows incl. one mean row per backbone, other-category rows, notes on the paper's backbone means)."""
    mvtec, notes = [], []
    for backbone in sorted({r.backbone for r in rows if r.paper is not None}):
        group = [r for r in rows if r.backbone == backbone and r.paper is not None]
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


INTRO = ("Best FINISHED run per (category, backbone) in MLflow experiment `{experiment}`, chosen by best/image_auroc; "
         "values at that run's selected epoch. paper = FastFlow (arXiv 2111.07677) with CaiT, per category, "
         "whatever our backbone; seed = the seed implementation (CaiT). diff = ours − paper. The paper reports "
         "no AUPRO. selection: test = epoch chosen on the test set (the paper's protocol), leak-free = on held-out "
         "normals + synthetic anomalies.")


def markdown(rows: list[ReportRow], experiment: str, generated: str) -> str:
    mvtec, others, notes = tables(rows)
    parts = ["# FastFlow: our results vs the paper", "", f"Generated {generated}. " + INTRO.format(experiment=experiment),
             "", "## MVTec AD", ""]
    parts += [_markdown_table(MVTEC_HEADER, mvtec) if mvtec else "No MVTec AD category has a finished run yet."]
    parts += ([""] + notes if notes else []) + (["", "![gaps](paper_gap.png)"] if mvtec else [])
    if others:
        parts += ["", "## Other categories (not in MVTec AD; no paper numbers)", "", _markdown_table(OTHER_HEADER, others)]
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


def html_page(rows: list[ReportRow], experiment: str, generated: str, chart_png: bytes) -> str:
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
        positions = list(range(len(group)))
        for offset, metric in ((-0.2, "image_auroc"), (0.2, "pixel_auroc")):
            values = [r.diff(metric) if r.diff(metric) is not None else 0.0 for r in group]
            axis.bar([p + offset for p in positions], values, width=0.4, label=LABELS[metric])
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xlim(-0.8, max(len(group), 4) - 0.2)  # a lone category keeps narrow bars
        axis.set_xticks(positions, [r.category for r in group], rotation=30, ha="right")
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
        group = [r for r in rows if r.backbone == backbone and r.paper is not None]
        for metric in PAPER_COMPARED:
            gap = _mean([r.diff(metric) for r in group])
            if gap is not None:
                metrics[f"report/{backbone}/mean_{metric}_gap"] = gap
    return metrics


def write_report(experiment: str = "fastflow", out: Path = Path("reports"), uri: str = "",
                 log_to_mlflow: bool = True) -> ReportResult:
    """Write paper_gap.md/.html/.png into `out` from the experiment's runs; log them to a `report` run."""
    from .tracking import finished_runs, log_report_run

    rows = best_rows(finished_runs(experiment, uri=uri))
    if not rows:
        raise LookupError(f"no FINISHED run tagged category and backbone with best/image_auroc in experiment "
                          f"'{experiment}'; train or sweep first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    chart = gap_chart(rows)
    (out / "paper_gap.png").write_bytes(chart)
    (out / "paper_gap.md").write_text(markdown(rows, experiment, generated))
    (out / "paper_gap.html").write_text(html_page(rows, experiment, generated, chart))
    files = [out / name for name in FILES]
    run_id = log_report_run(experiment, files, summary_metrics(rows), uri) if log_to_mlflow else ""
    log.info("report: %d rows -> %s (run %s)", len(rows), out, run_id)
    return ReportResult(rows, files, run_id)


__all__ = ["write_report", "best_rows", "markdown", "ReportRow", "ReportResult"]
