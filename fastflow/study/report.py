"""`fastflow report`: our best configuration per (category, backbone) against the paper and the peers ->
reports/paper_gap.{md,html,png}.

Reads FINISHED runs tagged `category` and `backbone` with `best/image_auroc` from MLflow. Runs identical but for
`train.seed` are one configuration; per (category, backbone, selection protocol, implementation) the configuration
whose seeds rank best on average by that protocol's own metrics (fastflow.engine.protocol: leak-free rows by the
validation metrics, test-set rows by the test metrics) is reported: its figures averaged over seeds, with their
spread and a 95% bootstrap interval over test images (fastflow.core.metrics, from each run's per-image test scores and
binned test pixels). They are compared with the paper's CaiT per-category numbers, the seed implementation's and
anomalib's published ones (fastflow/data/paper.py). Each row also shows its validation figures and selection fidelity
(fastflow.engine.selection), and studies get a table of their fidelity across trials. The files are also logged to a run
named `report`. Rows: pages/report_rows.py; rendering: pages/report_page.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fastflow.pages.report_page import gap_chart, html_page, markdown, summary_metrics
from fastflow.pages.report_rows import ReportRow, attach_intervals, best_rows, reference_rows, study_rows
from fastflow.tracking.logger import REFERENCE_PIXEL_COUNTS, REFERENCE_TEST_SCORES
from fastflow.tracking.results import finished_runs, read_pixel_counts, read_test_scores
from fastflow.tracking.runs import log_report_run


log = logging.getLogger(__name__)
FILES = ("paper_gap.md", "paper_gap.html", "paper_gap.png")


@dataclass
class ReportResult:
    rows: list[ReportRow]
    files: list[Path]
    run_id: str = ""  # the MLflow `report` run ("" when not logged)
    reference_rows: list[ReportRow] = field(default_factory=list)  # "kNN on the same features", beside `rows`


def write_report(experiment: str = "fastflow", out: Path = Path("reports"), uri: str = "",
                 log_to_mlflow: bool = True) -> ReportResult:
    """Write paper_gap.md/.html/.png into `out` from the experiment's runs; log them to a `report` run."""
    runs = finished_runs(experiment, uri=uri)
    rows, studies = best_rows(runs), study_rows(runs)
    attach_intervals(rows, read_test_scores, read_pixel_counts)
    if not rows:
        raise LookupError(f"no FINISHED run tagged category and backbone with best/image_auroc in experiment "
                          f"'{experiment}'; train or sweep first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    references = reference_rows(rows, runs)  # the same features without a flow, beside each of our rows
    attach_intervals(references, lambda run_id: read_test_scores(run_id, REFERENCE_TEST_SCORES),
                     lambda run_id: read_pixel_counts(run_id, REFERENCE_PIXEL_COUNTS))
    shown = rows + references
    chart = gap_chart(shown)
    (out / "paper_gap.png").write_bytes(chart)
    (out / "paper_gap.md").write_text(markdown(shown, experiment, generated, studies))
    (out / "paper_gap.html").write_text(html_page(shown, experiment, generated, chart, studies))
    files = [out / name for name in FILES]
    run_id = log_report_run(experiment, files, summary_metrics(shown), uri) if log_to_mlflow else ""
    log.info("report: %d rows -> %s (run %s)", len(rows), out, run_id)
    return ReportResult(rows, files, run_id, references)

