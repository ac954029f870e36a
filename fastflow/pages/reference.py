"""How pages and the terminal name and show the kNN feature reference (`engine.reference`) beside the flows."""

from __future__ import annotations

from typing import Mapping, Optional

from fastflow.engine.reference import LABEL, PREFIX

PROTOCOL_NOTE = "leak-free by construction: no training, no epoch, no test label in any choice"


def _value(values: Mapping[str, float], metric: str) -> Optional[float]:
    return values.get(PREFIX + metric)


def reference_figure(values: Mapping[str, float], metric: str) -> str:
    """`.943 [.90, .97]`: the reference's value of `metric` with its 95% bootstrap interval when logged; '–' when the
    run has no reference."""
    value = _value(values, metric)
    if value is None:
        return "–"
    low, high = _value(values, f"{metric}_ci_low"), _value(values, f"{metric}_ci_high")
    interval = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{value:.3f}{interval}"


def reference_line(values: Mapping[str, float], category: str = "") -> str:
    """One line for the terminal and run descriptions: every figure of the reference and its protocol."""
    where = f" on {category}" if category else ""
    figures = [f"image AUROC {reference_figure(values, 'image_auroc')}",
               f"pixel AUROC {reference_figure(values, 'pixel_auroc')}",
               f"AUPRO {reference_figure(values, 'aupro')}",
               f"off-defect image AUROC {reference_figure(values, 'off_defect_image_auroc')}"]
    return f"{LABEL}{where} ({PROTOCOL_NOTE}; test set scored): " + ", ".join(figures)
