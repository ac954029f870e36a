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
RANKED_METRICS = tuple(dict.fromkeys(PAPER.ranking + LEAK_FREE.ranking))  # every metric either protocol ranks by


def protocol_for_objective(objective: str) -> Protocol:
    if objective not in PROTOCOLS:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    return PROTOCOLS[objective]


def protocol_named(name: str) -> Protocol:
    """The protocol whose tag value (`Protocol.name`) is `name`."""
    found = [p for p in PROTOCOLS.values() if p.name == name]
    if not found:
        raise ValueError(f"unknown selection protocol {name!r}; known: {', '.join(p.name for p in PROTOCOLS.values())}")
    return found[0]


def protocol_for_metric(selection_metric: str) -> Protocol:
    """The protocol a best-epoch `eval.selection_metric` belongs to (validation metrics are leak-free)."""
    return LEAK_FREE if selection_metric.startswith("val_") else PAPER


def ranking_key(metrics: Mapping[str, float], protocol: Protocol, prefix: str = "") -> tuple[float, ...]:
    """Sort key (larger is better) over `protocol.ranking`, reading `prefix + name`; missing or NaN ranks last."""
    return names_key(metrics, protocol.ranking, prefix)


def names_key(metrics: Mapping[str, float], names: tuple[str, ...], prefix: str = "") -> tuple[float, ...]:
    """Sort key (larger is better) over `names`, reading `prefix + name`; missing or NaN ranks last."""
    def value(name: str) -> float:
        v = metrics.get(prefix + name)
        return -math.inf if v is None or not math.isfinite(float(v)) else float(v)

    return tuple(value(name) for name in names)


AUTO = "auto"  # `eval.selection_metric` / `eval.threshold`: leak-free when held-out normals exist, else the test set


def resolve_selection(selection_metric: str, has_validation: bool) -> tuple[Protocol, tuple[str, ...]]:
    """The protocol of a run's best-epoch choice and its ranking: the selection metric, then the same
    protocol's other metrics as tie-breaks (a leak-free tie is never broken by a test metric)."""
    metric = (LEAK_FREE.metric if has_validation else PAPER.metric) if selection_metric == AUTO else selection_metric
    protocol = protocol_for_metric(metric)
    if protocol is LEAK_FREE and not has_validation:
        raise ValueError(f"eval.selection_metric={metric} needs held-out normals: a validation/good folder "
                         "or data.val_fraction > 0 with enough train/good images")
    return protocol, (metric, *(name for name in protocol.ranking if name != metric))


def resolve_threshold(threshold: str, has_validation: bool, quantile: float) -> tuple[str, str]:
    """(stored threshold kind, its source as tagged on the run, checkpoint and registered version)."""
    kind = ("val_quantile" if has_validation else "f1") if threshold == AUTO else threshold
    if kind == "val_quantile" and not has_validation:
        raise ValueError("eval.threshold=val_quantile needs held-out normals (validation/good or data.val_fraction > 0)")
    if kind == "val_quantile":
        return kind, f"{LEAK_FREE.name}: quantile {quantile:g} of held-out normal scores"
    return kind, f"{PAPER.name}: F1-max on test labels"


__all__ = ["Protocol", "LEAK_FREE", "PAPER", "PROTOCOLS", "OBJECTIVES", "RANKED_METRICS", "protocol_for_objective",
           "protocol_named", "protocol_for_metric", "ranking_key", "names_key", "AUTO", "resolve_selection", "resolve_threshold"]
