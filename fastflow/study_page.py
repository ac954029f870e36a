"""The study page: one self-contained HTML file on a sweep's parent run (MLflow shows it in the artifact viewer).

Trials ranked by the study's protocol (objective, then its tie-breaking metrics) with their parameters, their
test-set and leak-free metrics, their state (complete, pruned, failed) and links to their runs; the best
trial's heatmaps and the study figures, inlined as PNG so the file needs nothing else. No MLflow here.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from .protocol import LEAK_FREE, PAPER, RANKED_METRICS, Protocol, ranking_key

STATE_NOTES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "waiting"}


@dataclass
class TrialRow:
    number: int
    state: str  # complete | pruned | failed | running | waiting
    value: Optional[float]  # the objective (complete trials)
    params: dict
    metrics: dict[str, float]  # metric name (no prefix) -> value: best epoch if complete, else the last epoch logged
    run_id: str = ""
    run_name: str = ""
    experiment_id: str = ""
    note: str = ""  # e.g. "pruned at epoch 2", the error of a failed run
    rank: tuple = field(default_factory=tuple)


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _metrics(run: Mapping, complete: bool, user_attrs: Mapping) -> dict[str, float]:
    names = RANKED_METRICS
    logged = run.get("metrics", {})
    prefix = "best/" if complete else "eval/"
    values = {name: logged[prefix + name] for name in names if prefix + name in logged}
    values.update({name: float(user_attrs[name]) for name in names if name not in values and name in user_attrs})
    if complete and "best/epoch" in logged:
        values["epoch"] = logged["best/epoch"]
    return values


def trial_rows(trials: Sequence, runs: Mapping[str, Mapping], protocol: Protocol) -> list[TrialRow]:
    """Optuna trials + their MLflow runs (`tracking.child_run_summaries`) -> rows, best first.

    Complete trials come first, ranked by `protocol.ranking` (ties: earlier trial first); then pruned trials
    by their last reported objective, then the others by number.
    """
    rows = []
    for trial in trials:
        state = STATE_NOTES.get(trial.state.name, trial.state.name.lower())
        run_id = trial.user_attrs.get("mlflow_run_id", "")
        run = runs.get(run_id, {})
        tags = run.get("tags", {})
        metrics = _metrics(run, state == "complete", trial.user_attrs)
        note = f"at epoch {tags['pruned_at_epoch']}" if "pruned_at_epoch" in tags else ""
        if state == "failed":
            note = tags.get("error", "")[:200]
        value = trial.value if state == "complete" else None
        last = trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None
        rank = ranking_key({**metrics, protocol.metric: value if value is not None else last}, protocol)
        rows.append(TrialRow(trial.number, state, value, dict(trial.params), metrics, run_id,
                             run.get("name", ""), run.get("experiment_id", ""), note, rank))
    order = {"complete": 0, "pruned": 1}
    return sorted(rows, key=lambda r: (order.get(r.state, 2), tuple(-v for v in r.rank) if r.state in order else (),
                                       r.number))


def _number(value: Optional[float]) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


STYLE = """body{font-family:system-ui,sans-serif;margin:16px;color:#1a1a1a}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f2f2f2}td.l,th.l{text-align:left;white-space:nowrap}td.s{white-space:normal;min-width:10em}tr.best{background:#e6f4ea;font-weight:600}
tr.pruned{color:#8a6d00;background:#fff8e1}tr.failed{color:#b00020;background:#fdecea}
img{max-width:100%;border:1px solid #ddd;margin:4px 0}.note{color:#555;font-size:13px}h2{margin-top:28px}"""

LINK_SCRIPT = """<script>
// The page is shown from a blob: URL inside MLflow's artifact viewer (or opened from the server directly):
// point each run link at the same MLflow server.
(function(){var m=/^blob:(https?:\\/\\/[^\\/]+)/.exec(location.href);
var base=m?m[1]:(location.protocol.indexOf('http')===0?location.origin:'');
document.querySelectorAll('a[data-run]').forEach(function(a){if(base){a.href=base+'/#/experiments/'+
a.dataset.experiment+'/runs/'+a.dataset.run+'?workflowType=machine_learning';}});})();
</script>"""


def _table(rows: list[TrialRow], protocol: Protocol, best: Optional[int]) -> str:
    params = sorted({name for row in rows for name in row.params})
    test, leak_free = PAPER.ranking, LEAK_FREE.ranking
    head = ['<th class="l" rowspan="2">trial</th>', '<th class="l" rowspan="2">MLflow run</th>',
            '<th class="l" rowspan="2">state</th>',
            f'<th rowspan="2">objective<br>{html.escape(protocol.metric)}</th>',
            f'<th colspan="{len(test)}">test set (paper protocol)</th>',
            f'<th colspan="{len(leak_free)}">leak-free (held-out normals + synthetic anomalies)</th>',
            '<th rowspan="2">best epoch</th>', f'<th class="l" colspan="{len(params)}">parameters</th>']
    sub = [f"<th>{html.escape(n)}</th>" for n in (*test, *leak_free)]
    sub += [f'<th class="l">{html.escape(p)}</th>' for p in params]
    lines = ["<table>", "<tr>" + "".join(head) + "</tr>", "<tr>" + "".join(sub) + "</tr>"]
    for row in rows:
        css = "best" if row.number == best else row.state
        link = (f'<a data-run="{html.escape(row.run_id)}" data-experiment="{html.escape(row.experiment_id)}" '
                f'title="run id {html.escape(row.run_id)}">{html.escape(row.run_name or row.run_id)}</a>'
                if row.run_id else "")
        state = html.escape(row.state + (f" {row.note}" if row.state == "pruned" else f" ({row.note})" if row.note else ""))
        cells = [f'<td class="l">#{row.number}{" (best)" if row.number == best else ""}</td>',
                 f'<td class="l">{link}</td>', f'<td class="l s">{state}</td>', f"<td>{_number(row.value)}</td>"]
        cells += [f"<td>{_number(row.metrics.get(n))}</td>" for n in (*test, *leak_free)]
        epoch = row.metrics.get("epoch")
        cells.append(f"<td>{'' if epoch is None else int(epoch)}</td>")
        cells += [f'<td class="l">{html.escape(str(row.params.get(p, "")))}</td>' for p in params]
        lines.append(f'<tr class="{css}">' + "".join(cells) + "</tr>")
    return "\n".join(lines + ["</table>"])


def render_study_page(study_name: str, category: str, protocol: Protocol, rows: list[TrialRow],
                      best: Optional[int], heatmaps: Optional[bytes], figures: Mapping[str, bytes]) -> str:
    """The whole page as one HTML string (images inlined)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    complete = [row.value for row in rows if row.value is not None]
    spread = (f"; objective over complete trials {min(complete):.4f} .. {max(complete):.4f}" if complete else "")
    rule = " > ".join(protocol.ranking)
    parts = [
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
        f"<title>study {html.escape(study_name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Study {html.escape(study_name)}</h1>",
        f"<p>Category <b>{html.escape(category)}</b>. Selection protocol: <b>{html.escape(protocol.label)}</b>. "
        f"Trials ranked by {html.escape(rule)} (each later metric breaks ties of the earlier ones; "
        f"same protocol). " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + html.escape(spread) + ".</p>",
        '<p class="note">Complete trials show their best epoch; pruned and failed trials the last epoch they '
        "logged. Test-set columns use test labels (paper protocol); leak-free columns use held-out normal "
        "images plus synthetic anomalies only.</p>",
        "<h2>Trials</h2>", _table(rows, protocol, best),
    ]
    if best is not None and heatmaps:
        parts += [f"<h2>Best trial #{best}: test-image heatmaps at its best epoch</h2>",
                  _img(heatmaps, f"heatmaps of trial {best}")]
    if figures:
        parts.append("<h2>Study figures</h2>")
        parts += [f"<h3>{html.escape(name.rsplit('.', 1)[0].replace('_', ' '))}</h3>" + _img(png, name)
                  for name, png in figures.items()]
    parts += [LINK_SCRIPT, "</body></html>"]
    return "\n".join(parts)


__all__ = ["TrialRow", "trial_rows", "render_study_page", "figure_png"]
