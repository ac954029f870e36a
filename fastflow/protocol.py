"""Model-selection protocols: the one place that names them, their objectives and how runs are ranked.

- leak-free: epochs, trials and thresholds are chosen on held-out normal images plus synthetic anomalies;
  no test label is looked at, so the test figures of the chosen model are what a user will see on new parts.
- paper: chosen on the test set, as the paper and the peers do; optimistic by construction.

Every tag, terminal line and report cell that states a protocol uses `Protocol.label`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class Protocol:
    name: str  # tag value `selection_protocol`
    objective: str  # `fastflow sweep --objective` value
    label: str  # human-readable, printed and tagged
    ranking: tuple[str, ...]  # metric names without the `eval/` prefix: the first is the objective, the rest break ties

    @property
    def metric(self) -> str:
        return self.ranking[0]


LEAK_FREE = Protocol("leak-free", "val", "leak-free (held-out normals + synthetic anomalies)",
                     ("val_image_auroc", "val_pixel_auroc", "val_aupro"))
PAPER = Protocol("test-set", "test", "test set (paper protocol)", ("image_auroc", "pixel_auroc", "aupro"))
PROTOCOLS = {p.objective: p for p in (LEAK_FREE, PAPER)}
OBJECTIVES = tuple(PROTOCOLS)


def protocol_for_objective(objective: str) -> Protocol:
    if objective not in PROTOCOLS:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    return PROTOCOLS[objective]


def protocol_for_metric(selection_metric: str) -> Protocol:
    """The protocol a best-epoch `eval.selection_metric` belongs to (validation metrics are leak-free)."""
    return LEAK_FREE if selection_metric.startswith("val_") else PAPER


def ranking_key(metrics: Mapping[str, float], protocol: Protocol, prefix: str = "") -> tuple[float, ...]:
    """Sort key (larger is better) over `protocol.ranking`, reading `prefix + name`; missing or NaN ranks last."""
    def value(name: str) -> float:
        v = metrics.get(prefix + name)
        return -math.inf if v is None or not math.isfinite(float(v)) else float(v)

    return tuple(value(name) for name in protocol.ranking)


__all__ = ["Protocol", "LEAK_FREE", "PAPER", "PROTOCOLS", "OBJECTIVES", "protocol_for_objective",
           "protocol_for_metric", "ranking_key"]
