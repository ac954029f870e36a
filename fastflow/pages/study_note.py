"""A study in words: the parent run's and each trial's MLflow description (markdown), and the terminal summary.

MLflow renders a run's description (tag `mlflow.note.content`) as GitHub-flavoured markdown at the top of the
run's Overview, sanitized, links opening in a new tab. Links here are relative to the page the UI is served
from (`#/experiments/<id>/runs/<id>`, `#/models/<name>/versions/<n>`), so they work on any host or prefix; images
come from the server's `get-artifact` route. Every AUROC carries its 95% bootstrap interval. No MLflow here.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence
from urllib.parse import quote

from fastflow.engine.protocol import Protocol
from fastflow.pages._format import markdown_row, number
from fastflow.pages.model_card import run_link, version_link
from fastflow.pages.reference import reference_line
from fastflow.pages.study_page import (INTERVAL_NOTE, LABELS, TrialRow, figure_columns, figure_value, interval_text,
                                       param_text, reference_lines, state_text)

NOTE_LIMIT = 7800  # MLflow keeps 8000 characters of a tag value


@dataclass(frozen=True)
class Champion:
    """What the study's best trial became in the registry (`registry.Promotion`, in words)."""
    model: str  # registered model name
    version: str  # the best trial's version
    holds_alias: bool  # that version is now @champion
    champion_version: Optional[str]  # the version @champion points at


def md(text: str) -> str:
    """Free text (an error message, a parameter value) safe in markdown and its HTML: markup characters become
    entities, so a table cell stays one cell and nothing turns into a link, emphasis or tag."""
    escaped = html.escape(str(text), quote=False)
    escaped = re.sub(r"[\\`*\[\]|#~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", lambda m: f"&#{ord(m.group())};", escaped)
    return escaped.replace("\n", " ")


def code(text: str) -> str:
    """An identifier (study, category, metric, model name) as inline code, which markdown shows literally."""
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def ranking(protocol: Protocol) -> str:
    return " > ".join(code(name) for name in protocol.ranking)


def artifact_image(run_id: str, path: str, alt: str) -> str:
    """An artifact shown inline, through the tracking server's `get-artifact` route."""
    return f"![{md(alt)}](get-artifact?path={quote(str(path))}&run_uuid={quote(str(run_id))})"


def figure_cell(row: TrialRow, metric: str, protocol: Protocol) -> str:
    value = figure_value(row, metric, protocol)
    if value is None:
        return ""
    text = f"{number(value)} {interval_text(row, metric)}".strip()
    return f"**{text}**" if metric == protocol.metric else text


def _params(params: Mapping) -> str:
    return ", ".join(f"{md(str(k).split('.')[-1])}={md(param_text(v))}" for k, v in sorted(params.items()))


def model_uri(champion: Optional[Champion], best: TrialRow) -> str:
    """How to load the study's result: the registry alias, or the best trial's own logged model."""
    if champion is not None:
        return f"models:/{champion.model}@champion"
    return best.model_uri or f"runs:/{best.run_id}/model"


def champion_line(champion: Optional[Champion], best: Optional[TrialRow], protocol: Protocol) -> str:
    """One line, the first a reader sees (MLflow folds long descriptions): the best trial, its objective with
    interval and test image AUROC, where it went in the registry, and the URI that loads it."""
    if best is None:
        return "**No trial completed yet**: no champion."
    name = f"[{md(best.run_name or best.run_id)}]({run_link(best.experiment_id, best.run_id)})"
    figures = f"{code(protocol.metric)} {figure_cell(best, protocol.metric, protocol)} ({protocol.name})"
    if protocol.metric != "image_auroc" and figure_value(best, "image_auroc", protocol) is not None:
        figures += f", test image AUROC {figure_cell(best, 'image_auroc', protocol)}"
    if champion is None:
        where = "not registered"
    else:
        version = f"[{md(champion.model)} v{md(champion.version)}]({version_link(champion.model, champion.version)})"
        held = champion.champion_version or "?"
        where = (f"registered as {version}, **@champion**" if champion.holds_alias else
                 f"registered as {version}; **@champion** stays on [v{md(held)}]({version_link(champion.model, held)}),"
                 " which ranks higher by the same rule")
    return (f"**Best trial #{best.number} {name}**: {figures}; {where}. "
            f"Load: `mlflow.pyfunc.load_model(\"{model_uri(champion, best)}\")`")


def load_lines(champion: Optional[Champion], best: Optional[TrialRow]) -> list[str]:
    """The lines that load the study's result in Python and with the CLI."""
    if best is None:
        return []
    uri = model_uri(champion, best)
    return ["```python", "import mlflow", f"model = mlflow.pyfunc.load_model({uri!r})",
            "out = model.predict(images_uint8_nhwc)  # scores, normalized_scores, is_anomalous, anomaly_maps", "```",
            f"or `fastflow predict --model {uri} --input 'photos/*.png'`"]


def _table(rows: Sequence[TrialRow], protocol: Protocol, budget: int) -> list[str]:
    """Markdown table of the trials, best first, cut to `budget` characters (a last line counts the rest)."""
    columns = figure_columns(protocol)
    head = ["rank", "trial", "state", *(("objective: " if n == protocol.metric else "") + LABELS[n] for n in columns),
            "best epoch", "parameters"]
    lines = [markdown_row(head), "|" + "---:|" + "---|" * 2 + "---|" * len(columns) + "---:|---|"]
    used = sum(len(line) + 1 for line in lines)
    for index, row in enumerate(rows):
        run = f"[{md(row.run_name or row.run_id)}]({run_link(row.experiment_id, row.run_id)})" if row.run_id else ""
        epoch = row.metrics.get("epoch") if row.state == "complete" else None
        cells = [str(row.place or "–"), f"#{row.number} {run}", md(state_text(row)[:120]),
                 *(figure_cell(row, n, protocol) for n in columns), "" if epoch is None else str(int(epoch)),
                 _params(row.params)]
        line = markdown_row(cells)
        if used + len(line) + 100 > budget:  # room for the line counting the rest
            rest = ["…", f"{len(rows) - index} more trials: see `study.html`"] + [""] * (len(head) - 2)
            lines.append(markdown_row(rest))
            break
        lines.append(line)
        used += len(line) + 1
    return lines


def study_description(study_name: str, category: str, protocol: Protocol, rows: Sequence[TrialRow],
                      experiment_id: str, parent_run_id: str, champion: Optional[Champion] = None,
                      fidelity: str = "") -> str:
    """The parent run's description: the best trial and how to load it first (MLflow folds the rest), what was
    searched and how it was ranked, the ranked trial table with links to every trial's run, the selection
    fidelity and a link to the study page. No images: MLflow widens the page to an image's natural width."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    best = next((row for row in rows if row.place == 1), None)
    head = [champion_line(champion, best, protocol), "",
            *(f"- Reference{f' ({code(preset)} features)' if preset else ''}: {md(line)}." for preset, line
              in reference_lines(rows).items()), "",
            f"Study {code(study_name)}, category {code(category)}: {len(rows)} trials ("
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"), selection protocol **{protocol.label}**, "
            f"ranked by {ranking(protocol)} (later metrics break ties). Every trial, linked to its run:", ""]
    foot = ["", *load_lines(champion, best), "", f"Figures at each complete trial's best epoch. Test figures use test labels: for a leak-free pick, "
            "what the chosen configuration delivers on new parts; under the test-set protocol, an upper bound. "
            f"{INTERVAL_NOTE}. Pruned and failed trials stop before their summary, so they have no figures here "
            "(their runs hold the per-epoch curves). Heatmaps of the best trial and the study figures: "
            f"[study.html]({run_link(experiment_id, parent_run_id, 'artifacts/study.html')}), figures also under "
            f"[study/]({run_link(experiment_id, parent_run_id, 'artifacts/study')})."]
    if fidelity:
        foot += ["", fidelity[0].upper() + fidelity[1:] + "."]
    budget = NOTE_LIMIT - sum(len(line) + 1 for line in head + foot)
    return "\n".join(head + _table(rows, protocol, budget) + foot)


def trial_description(row: TrialRow, protocol: Protocol, complete: int, study_name: str, parent_link: str,
                      champion: Optional[Champion] = None) -> str:
    """A trial run's description: its rank, objective (with interval), state and best epoch, its test-set and
    leak-free figures, its study (linked) and, for a complete trial, its curves."""
    study = f"study [{code(study_name)}]({parent_link})"
    if row.state != "complete":
        return (f"**{md(state_text(row)[:300])}**: trial #{row.number} of {study}; not ranked (only complete trials "
                "are). Its per-epoch curves are under Model metrics.")
    objective = figure_cell(row, protocol.metric, protocol)
    others = [f"{LABELS[n]} {figure_cell(row, n, protocol)}" for n in figure_columns(protocol)[1:]
              if figure_value(row, n, protocol) is not None]
    epoch = row.metrics.get("epoch")
    lines = [f"**Rank {row.place} of {complete}** complete trials of {study}, ranked by "
             f"{ranking(protocol)}, {protocol.label}.", "",
             f"- objective {code(protocol.metric)}: {objective}",
             f"- state: complete; best epoch {'?' if epoch is None else int(epoch)}, chosen by {protocol.name}",
             f"- at that epoch: {'; '.join(others)}",
             *([f"- beside it, {md(reference_line(row.reference))}"] if row.reference else []),
             f"- {INTERVAL_NOTE}"]
    if champion is not None and row.place == 1:
        link = f"[{md(champion.model)} v{md(champion.version)}]({version_link(champion.model, champion.version)})"
        lines.append(f"- registered as {link}" + (", **@champion**" if champion.holds_alias else ""))
    lines += ["", artifact_image(row.run_id, "curves.png", "per-epoch curves, chosen epoch marked")]
    return "\n".join(lines)


def terminal_summary(study_name: str, rows: Sequence[TrialRow], protocol: Protocol,
                     paper: Optional[Mapping[str, float]], fidelity: str) -> str:
    """Plain text for the terminal: the best trial's parameters and figures (AUROCs with their intervals), next
    to the paper's number for MVTec categories."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    lines = [f"study {study_name}: " + ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))]
    best = next((row for row in rows if row.place == 1), None)
    if best is None:
        return "\n".join(lines + ["no trial completed"])
    epoch = best.metrics.get("epoch")
    lines.append(f"best trial #{best.number} (run {best.run_name} {best.run_id}): {protocol.metric} "
                 f"{figure_cell(best, protocol.metric, protocol).strip('*')}, epoch "
                 f"{'?' if epoch is None else int(epoch)}; selection: {protocol.label}")
    lines += [f"  {name:<24} {param_text(value)}" for name, value in best.params.items()]
    lines.append(f"  {'':<24} {'ours':>6}  {'95% interval':<16} {'kNN':>6}  {'paper':>6}")
    for name in ("image_auroc", "pixel_auroc", "aupro", "val_image_auroc"):
        value = figure_value(best, name, protocol)
        if value is not None:
            theirs = (paper or {}).get(name) if not name.startswith("val_") else None
            lines.append(f"  {name:<24} {number(value):>6}  {interval_text(best, name):<16} "
                         f"{number(best.reference.get(name), missing='-'):>6}  "
                         f"{'-' if theirs is None else f'{theirs:.3f}':>6}")
    lines.append("  (ours: test set at the selected epoch; val_*: held-out normals + synthetic anomalies; "
                 "kNN: the nearest training patch on the same backbone features, no training, leak-free by "
                 "construction; intervals: bootstrap over the images)")
    if paper:
        lines.append("  (paper: CaiT per-category numbers, test-set selection)")
    return "\n".join(lines + [fidelity])


__all__ = ["Champion", "study_description", "trial_description", "terminal_summary", "md", "code",
           "version_link", "NOTE_LIMIT"]
