"""The study page: one self-contained HTML file on a sweep's parent run (MLflow shows it in the artifact viewer).

Trials ranked by the study's protocol (objective, then its tie-breaking metrics) with their test-set and
leak-free figures (each AUROC with its 95% bootstrap interval), their state (complete, pruned, failed), run ids
and parameters; the best trial's heatmaps and the study figures, inlined as PNG so the file needs nothing else.
`TrialRow` and the cell formatting are shared with `study_note` (the run descriptions). No MLflow here.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from fastflow.core.metrics import INTERVAL_LEVEL, INTERVAL_METRICS
from fastflow.engine.protocol import Protocol, RANKED_METRICS, ranking_key
from fastflow.pages._format import STYLE, interval, logged_intervals, number
from fastflow.pages.reference import reference_line, reference_values

STATE_NOTES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "waiting"}
LABELS = {"val_image_auroc": "leak-free image AUROC", "image_auroc": "test image AUROC",
          "pixel_auroc": "test pixel AUROC", "aupro": "test AUPRO"}  # the figures each trial row shows
INTERVAL_NOTE = (f"[low, high]: {INTERVAL_LEVEL:.0%} bootstrap interval over the images (test images for test "
                 "figures, validation images for leak-free ones)")


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
    note: str = ""  # e.g. "at epoch 2" (pruned), the error of a failed run
    rank: tuple = field(default_factory=tuple)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (low, high), best epoch
    place: Optional[int] = None  # 1 = best complete trial; None for trials that did not complete
    model_uri: str = ""  # the run's logged model
    reference: dict[str, float] = field(default_factory=dict)  # the run's kNN reference (`pages.reference`)


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
        intervals = logged_intervals(run.get("metrics", {}), INTERVAL_METRICS) if state == "complete" else {}
        rows.append(TrialRow(trial.number, state, value, dict(trial.params), metrics, run_id, run.get("name", ""),
                             run.get("experiment_id", ""), note, rank, intervals, model_uri=tags.get("model_uri", ""),
                             reference=reference_values(run.get("metrics", {}))))
    order = {"complete": 0, "pruned": 1}
    rows.sort(key=lambda r: (order.get(r.state, 2), tuple(-v for v in r.rank) if r.state in order else (), r.number))
    for place, row in enumerate((r for r in rows if r.state == "complete"), start=1):
        row.place = place
    return rows


# ---------------------------------------------------------------- cells shared with the run descriptions


def figure_columns(protocol: Protocol) -> list[str]:
    """The figures a trial row shows: the objective first, then the test-set and leak-free ones."""
    return [protocol.metric, *(name for name in LABELS if name != protocol.metric)]


def interval_text(row: TrialRow, metric: str) -> str:
    """`[low, high]` of an AUROC of a complete trial; `[no interval]` for runs logged before intervals were;
    empty for metrics that have none (AUPRO)."""
    if metric not in INTERVAL_METRICS:
        return ""
    if metric not in row.intervals:
        return "[no interval]"
    return interval(*row.intervals[metric])


def figure_value(row: TrialRow, metric: str, protocol: Protocol) -> Optional[float]:
    """A complete trial's figure at its best epoch (the objective: the trial's value). Pruned and failed trials
    stop before their summary (no best epoch, no interval), so they show none."""
    if row.state != "complete":
        return None
    return row.value if metric == protocol.metric and row.value is not None else row.metrics.get(metric)


def state_text(row: TrialRow) -> str:
    if row.state == "pruned":
        return f"pruned {row.note}".strip()
    return row.state + (f" ({row.note})" if row.note else "")


def param_text(value) -> str:
    """A sampled value, floats to 3 significant digits (`0.00298`, `1.0`)."""
    if not isinstance(value, float):
        return str(value)
    text = f"{value:.3g}"
    return text if any(c in text for c in ".en") else f"{text}.0"


# ---------------------------------------------------------------- the HTML page


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


LINK_SCRIPT = """<script>
// MLflow's artifact viewer shows this page in a sandboxed frame, where no link can open (the sandbox blocks
// navigation out of the frame, and the app does not load inside it): there the run ids stay plain text to copy.
// Opened on its own (downloaded) with a known tracking server, the run names link to the runs.
(function(){var server=document.body.dataset.server||'';
if(window.self!==window.top||!server){return;}
document.querySelectorAll('a[data-run]').forEach(function(a){a.href=server+'/#/experiments/'+a.dataset.experiment+
'/runs/'+a.dataset.run;a.target='_blank';});
var note=document.getElementById('links');if(note){note.textContent='Run names link to the runs on '+server+'.';}})();
</script>"""


def _cell(row: TrialRow, metric: str, protocol: Protocol) -> str:
    value = figure_value(row, metric, protocol)
    if value is None:
        return "<td></td>"
    ci = interval_text(row, metric)
    return f'<td class="v">{number(value)}' + (f'<br><span class="ci">{html.escape(ci)}</span>' if ci else "") + "</td>"


def _table(rows: list[TrialRow], protocol: Protocol, best: Optional[int]) -> str:
    columns = figure_columns(protocol)
    head = ['<th>rank</th>', '<th class="l">trial, run id</th>', '<th class="l">state</th>']
    head += [f"<th>{'objective: ' if name == protocol.metric else ''}{html.escape(LABELS[name])}</th>"
             for name in columns]
    head += ["<th>best epoch</th>", '<th class="l">parameters</th>']
    lines = ["<table>", "<tr>" + "".join(head) + "</tr>"]
    for row in rows:
        css = "best" if row.number == best else row.state
        run = (f'<a data-run="{html.escape(row.run_id)}" data-experiment="{html.escape(row.experiment_id)}">'
               f'{html.escape(row.run_name or row.run_id)}</a><br><code class="id">{html.escape(row.run_id)}</code>'
               if row.run_id else "")
        params = "".join(f'<div class="p">{html.escape(str(k))} = {html.escape(param_text(v))}</div>'
                         for k, v in sorted(row.params.items()))
        epoch = row.metrics.get("epoch") if row.state == "complete" else None
        cells = [f"<td>{row.place or ''}</td>",
                 f'<td class="l">#{row.number}{" (best)" if row.number == best else ""}<br>{run}</td>',
                 f'<td class="l">{html.escape(state_text(row))}</td>']
        cells += [_cell(row, name, protocol) for name in columns]
        cells += [f"<td>{'' if epoch is None else int(epoch)}</td>", f'<td class="l">{params}</td>']
        lines.append(f'<tr class="{css}">' + "".join(cells) + "</tr>")
    return "\n".join(lines + ["</table>"])


def reference_lines(rows: Sequence[TrialRow]) -> dict[str, str]:
    """preset ('' when the space has one) -> the line of its features' kNN reference, the best trial's first."""
    lines: dict[str, str] = {}
    for row in rows:
        if row.reference:
            lines.setdefault(str(row.params.get("preset", "")), reference_line(row.reference))
    return lines


def reference_paragraphs(rows: Sequence[TrialRow]) -> list[str]:
    return [f"<p><b>Reference</b>{f' ({html.escape(preset)} features)' if preset else ''}: {html.escape(line)}.</p>"
            for preset, line in reference_lines(rows).items()]


def render_study_page(study_name: str, category: str, protocol: Protocol, rows: list[TrialRow],
                      best: Optional[int], heatmaps: Optional[bytes], figures: Mapping[str, bytes],
                      server: str = "") -> str:
    """The whole page as one HTML string (images inlined). `server`: the tracking server's URL when there is one
    (run names link there when the page is opened outside MLflow's viewer); run ids are always shown."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    rule = " > ".join(protocol.ranking)
    parts = [
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
        f"<title>study {html.escape(study_name)}</title><style>{STYLE}</style></head>",
        f"<body data-server=\"{html.escape(server)}\">",
        f"<h1>Study {html.escape(study_name)}</h1>",
        f"<p>Category <b>{html.escape(category)}</b>. Selection protocol: <b>{html.escape(protocol.label)}</b>. "
        f"Trials ranked by {html.escape(rule)} (each later metric breaks ties of the earlier ones; same protocol). "
        + html.escape(", ".join(f"{n} {s}" for s, n in sorted(counts.items()))) + ".</p>",
        f'<p class="note">Figures at each complete trial\'s best epoch, chosen by the {html.escape(protocol.name)} '
        "protocol. Test figures use test labels; leak-free figures use held-out normal images plus synthetic "
        f"anomalies only. {html.escape(INTERVAL_NOTE)}. Pruned and failed trials stop before their summary: no "
        "figures here (their runs hold the per-epoch curves).</p>",
        *reference_paragraphs(rows),
        "<h2>Trials</h2>",
        '<p class="note" id="links">Inside MLflow\'s artifact viewer no link can open (the viewer\'s sandbox blocks '
        "them): open a trial from the parent run's Overview, whose description links every trial, or paste its run "
        "id into the runs table's search box (<code>attributes.run_id = '&lt;id&gt;'</code>).</p>",
        _table(rows, protocol, best),
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


__all__ = ["TrialRow", "trial_rows", "render_study_page", "figure_png", "figure_columns", "figure_value",
           "interval_text", "state_text", "param_text", "reference_lines", "LABELS", "INTERVAL_NOTE"]
