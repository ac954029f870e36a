"""Descriptions of registered models and their versions, built from a run's tags and metrics (no I/O).

The registry shows them on the model and version pages, so a version says what it was trained on, how it
was chosen (protocol), how it decides (threshold and where that threshold comes from) and what it scored.
"""

from __future__ import annotations

from typing import Mapping
from urllib.parse import quote

from fastflow.core.metrics import INTERVAL_LEVEL, INTERVAL_METRICS
from fastflow.engine.protocol import RANKED_METRICS, protocol_for_metric
from fastflow.pages._format import interval, logged_intervals, markdown_table, number

KEY_METRICS = (*RANKED_METRICS, "epoch")


def registered_model_description(category: str) -> str:
    return (f"FastFlow anomaly detector for the category '{category}'. Input: uint8 RGB images (N,H,W,3) of any size. "
            "Outputs: scores (N,) raw image scores, normalized_scores (N,) in [0,1] with the threshold at 0.5, "
            "is_anomalous (N,) bool, anomaly_maps (N,S,S) at the model's input size. "
            "The alias @champion is the best version by the protocol named on each version. "
            f"Load with mlflow.pyfunc.load_model('models:/fastflow-{category}@champion').")


def run_link(experiment_id: str, run_id: str, tab: str = "") -> str:
    """A run page (or one of its tabs, e.g. `artifacts/study.html`) as a link relative to MLflow's UI, so it works
    on any host and static prefix, in the UI's machine-learning layout."""
    page = f"#/experiments/{quote(str(experiment_id))}/runs/{quote(str(run_id))}" + (f"/{quote(tab)}" if tab else "")
    return page + "?workflowType=machine_learning"


def version_link(model: str, version: str) -> str:
    """A registered model version's page, relative to MLflow's UI."""
    return f"#/models/{quote(str(model))}/versions/{quote(str(version))}"


def _interval(metrics: Mapping[str, float], name: str) -> str:
    if name not in INTERVAL_METRICS:
        return ""
    found = logged_intervals(metrics, [name])
    return interval(*found[name], digits=4) if name in found else "no interval logged"


def version_description(run_name: str, tags: Mapping[str, str], metrics: Mapping[str, float], metric: str,
                        run_link: str = "") -> str:
    """Markdown for one model version: its run (linked), data, protocol, threshold and the best-epoch metrics of
    its run with their bootstrap intervals.

    `metric` is the objective the version was ranked by (e.g. `image_auroc`); `metrics` the run's `best/*`;
    `run_link` the run page's UI route (`#/experiments/<id>/runs/<id>`).
    """
    protocol = protocol_for_metric(metric)
    kind = tags.get("threshold_kind", "")
    lines = [  # the first line is plain text: MLflow's versions table shows it as it is
        f"{tags.get('category', '?')} model from run {run_name}"
        + (f" (study {tags['study']}, trial {tags['trial_number']})" if "trial_number" in tags else ""),
        "",
        f"- run: [{run_name}]({run_link})" if run_link else f"- run: `{run_name}`",
        f"- data: category `{tags.get('category', '?')}`, content hash `{tags.get('data_hash', '?')}`, "
        f"root `{tags.get('data_root', '?')}`; held-out normals: {tags.get('validation_source', 'none recorded')}",
        f"- backbone: `{tags.get('backbone', '?')}`",
        f"- ranked by: {protocol.label}: " + " > ".join(f"`{name}`" for name in protocol.ranking)
        + " (later ones break ties)",
        f"- best epoch chosen by: {tags.get('selection_protocol', '?')}",
        f"- threshold: {tags['threshold']} ({kind}: {tags.get('threshold_source', 'source not recorded')})"
        if "threshold" in tags else "- threshold: not recorded",
        "",
    ]
    body = []
    for name in KEY_METRICS:
        value = metrics.get(f"best/{name}")
        if value is not None:
            where = "leak-free" if name.startswith("val_") else "-" if name == "epoch" else "test set"
            body.append([name, number(value, 4) if name != "epoch" else str(int(value)), _interval(metrics, name), where])
    header = ["metric (best epoch)", "value", f"{INTERVAL_LEVEL:.0%} bootstrap interval", "protocol"]
    return "\n".join(lines + [markdown_table(header, body)])


__all__ = ["registered_model_description", "version_description", "run_link", "version_link"]
