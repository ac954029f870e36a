"""The report's rendering: rows -> the markdown and HTML tables of reports/paper_gap.{md,html}, the gap chart
(paper_gap.png) and the summary metrics of the `report` run (what the report is: study/report.py)."""

from __future__ import annotations


import base64
import html
import io
from typing import Optional


from fastflow.data.paper import PAPER_MEANS, anomalib_best
from fastflow.engine.protocol import LEAK_FREE, PAPER
from fastflow.pages._format import STYLE, interval, markdown_table, number
from fastflow.pages.report_rows import METRICS, PAPER_COMPARED, ReportRow, StudyRow

LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}
PRESET_OF_BACKBONE = {"resnet18": "resnet18", "wide_resnet50_2": "wide_resnet50_2",
                      "deit_base_distilled_patch16_384": "deit", "cait_m48_448": "cait"}
def fidelity_cells(row: ReportRow) -> list[str]:
    """val image AUROC, val pixel AUROC, Spearman, optimism, test split-half reliability, off-defect image AUROC."""
    return [_fmt(row.validation.get("val_image_auroc")), _fmt(row.validation.get("val_pixel_auroc")),
            _fmt(row.fidelity.get("spearman"), signed=True), _fmt(row.fidelity.get("optimism")),
            _fmt(row.fidelity.get("test_reliability"), signed=True), _fmt(row.fidelity.get("off_defect"))]


STUDY_HEADER = ["study", "category", "selection", "complete trials", "Spearman(val, test)", "optimism",
                "test reliability"]


def study_cells(row: StudyRow) -> list[str]:
    points = row.fidelity.get("points")
    return [row.study, row.category, row.protocol, "-" if points is None else str(int(points)),
            _fmt(row.fidelity.get("spearman"), signed=True), _fmt(row.fidelity.get("optimism")),
            _fmt(row.fidelity.get("test_reliability"), signed=True)]


def _fmt(value: Optional[float], signed: bool = False) -> str:
    return number(value, signed=signed, missing="-")


def _mean(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def measured(row: ReportRow, metric: str) -> str:
    """`mean ± sd over seeds [95% interval over test images]`, each part where it is known."""
    text = _fmt(row.ours.get(metric))
    if metric in row.spread:
        text += f" ± {row.spread[metric]:.3f}"
    if metric in row.intervals:
        text += " " + interval(*row.intervals[metric])
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
    parts += [markdown_table(MVTEC_HEADER, mvtec) if mvtec else "No MVTec AD category has a finished run yet."]
    parts += ([""] + notes if notes else []) + (["", "![gaps](paper_gap.png)"] if mvtec else [])
    if others:
        parts += ["", "## Other categories (not in MVTec AD; no paper numbers)", "", markdown_table(OTHER_HEADER, others)]
    if studies:
        parts += ["", "## Studies: selection fidelity", "", STUDIES_INTRO, "",
                  markdown_table(STUDY_HEADER, [study_cells(s) for s in studies])]
    return "\n".join(parts) + "\n"


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = []
    for cells in body:
        tds = []
        for index, cell in enumerate(cells):
            kind = ' class="l"' if index < 2 else ""  # category and backbone (or study and category)
            if header[index] == "diff" and cell not in ("-", ""):
                kind = ' class="worse"' if cell.startswith("-") else ' class="better"'
            tds.append(f"<td{kind}>{html.escape(cell)}</td>")
        style = ' class="mean"' if cells[0].startswith("mean (") else ""
        lines.append(f"<tr{style}>{''.join(tds)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


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
    from fastflow.pages.visualize import plt

    compared = [r for r in rows if r.paper is not None and not r.implementation]  # ours: no peer, no kNN row
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
    rows = [r for r in rows if not r.implementation]  # the gaps are ours: peers' and the kNN rows stand apart
    for backbone in sorted({r.backbone for r in rows if r.paper is not None}):
        for protocol in sorted({r.protocol for r in rows if r.backbone == backbone and r.paper is not None}):
            group = [r for r in rows if r.backbone == backbone and r.paper is not None and r.protocol == protocol]
            prefix = f"report/{backbone}/" if protocol == PAPER.name else f"report/{backbone}/{protocol}/"
            for metric in PAPER_COMPARED:
                gap = _mean([r.diff(metric) for r in group])
                if gap is not None:
                    metrics[f"{prefix}mean_{metric}_gap"] = gap
    return metrics


