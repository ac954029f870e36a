"""How pages and the terminal name and show the kNN feature reference (`engine.reference`) beside the flows."""

from __future__ import annotations

from typing import Mapping

from fastflow.engine.reference import LABEL, PREFIX
from fastflow.pages._format import interval, number

PROTOCOL_NOTE = "leak-free by construction: no training, no epoch, no test label in any choice"
FIGURES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
           "off_defect_image_auroc": "off-defect image AUROC"}


def reference_values(metrics: Mapping[str, float]) -> dict[str, float]:
    """metric (no prefix) -> value of the `reference/*` keys among a run's metrics."""
    return {k[len(PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(PREFIX)}


def reference_figure(values: Mapping[str, float], metric: str) -> str:
    """`0.943 [0.901, 0.972]`: the reference's `metric` (from `reference_values`) with its 95% bootstrap interval
    over test images when logged; '–' when there is no reference."""
    if metric not in values:
        return "–"
    low, high = values.get(f"{metric}_ci_low"), values.get(f"{metric}_ci_high")
    return number(values[metric]) + (f" {interval(low, high)}" if low is not None and high is not None else "")


def reference_line(values: Mapping[str, float], category: str = "") -> str:
    """One line for the terminal and the run descriptions: every figure of the reference (`reference_values`), and
    its protocol."""
    where = f" on {category}" if category else ""
    figures = ", ".join(f"{label} {reference_figure(values, metric)}" for metric, label in FIGURES.items())
    return f"{LABEL}{where} ({PROTOCOL_NOTE}; scored on the test set): {figures}"
