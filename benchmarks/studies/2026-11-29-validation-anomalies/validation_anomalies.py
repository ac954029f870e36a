#!/usr/bin/env python
"""Which synthetic validation anomalies make leak-free model selection work? One training per seed, every
candidate validation set scored at every epoch (the flows never see the validation set, so this is the same
as one training per candidate, at a fraction of the cost).

    PYTHONPATH=. .venv/bin/python benchmarks/studies/2026-11-29-validation-anomalies/validation_anomalies.py --root ../shared/data/mvtec3d_tire \
        --category tire --seeds 0 1 2 --out /tmp/valexp

Per seed it writes `<out>/seed<N>.json` (per epoch: test metrics and each candidate's validation metrics, for
both anomaly maps); `--summarize` prints the table (means over seeds): the validation image AUROC's range over
epochs, the fraction of epochs below .99, its Spearman correlation with the test image AUROC across epochs and
the optimism (test AUROC at the test-best epoch minus at the validation-best epoch).
Protocol of every number: validation = held-out normals + synthetic anomalies; test = the real test set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/: per_seed.py

import per_seed  # noqa: E402  (benchmarks/per_seed.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from fastflow.core import metrics as M  # noqa: E402
from fastflow.core.anomaly_map import anomaly_map, image_score  # noqa: E402
from fastflow.data.anomalies import AnomalySpec  # noqa: E402
from fastflow.data.dataset import ImageDataset  # noqa: E402
from fastflow.data.features import EncodedSplit, encode  # noqa: E402
from fastflow.engine.evaluate import flow_outputs  # noqa: E402
from fastflow.engine.selection import fidelity  # noqa: E402

ALL = ("cutpaste", "scar", "texture", "distortion", "painted")
CANDIDATES = {  # one anomalous copy per held-out normal, so each candidate costs 29 images on tire
    "painted s=1 (old)": AnomalySpec(("painted",), (1.0, 1.0), copies=1),
    "cutpaste": AnomalySpec(("cutpaste",), copies=1),
    "scar": AnomalySpec(("scar",), copies=1),
    "texture": AnomalySpec(("texture",), copies=1),
    "distortion": AnomalySpec(("distortion",), copies=1),
    "mix s=0-1": AnomalySpec(ALL, copies=1),
    "mix s=0.5-1": AnomalySpec(ALL, (0.5, 1.0), copies=1),
    "mix s=0-0.3": AnomalySpec(ALL, (0.0, 0.3), copies=1),
    "mix no painted s=0-0.3": AnomalySpec(ALL[:4], (0.0, 0.3), copies=1),
}
MAPS = ("nll",)  # the preset's map
log = logging.getLogger("validation_anomalies")


@torch.inference_mode()
def maps_of(model, split: EncodedSplit, cfg, device) -> dict[str, torch.Tensor]:
    """Both anomaly maps `(N,S,S)` from one pass of the flows."""
    model.eval()
    size = (cfg.model.input_size, cfg.model.input_size)
    out: dict[str, list] = {kind: [] for kind in MAPS}
    for start in range(0, len(split), cfg.eval.batch_size):
        indices = torch.arange(start, min(start + cfg.eval.batch_size, len(split)))
        latents, log_jacs = model.forward_features(split.batch(indices, device))
        for kind in MAPS:
            out[kind].append(anomaly_map(kind, latents, log_jacs, size)[:, 0].cpu())
    return {kind: torch.cat(chunks) for kind, chunks in out.items()}


def scored(labels: np.ndarray, masks: np.ndarray, maps: torch.Tensor, cfg, aupro: bool = True) -> dict[str, float]:
    scores = image_score(maps[:, None], cfg.model.image_score, cfg.model.topk_fraction).numpy()
    values = {"image_auroc": M.image_auroc(labels, scores), "pixel_auroc": M.pixel_auroc(masks, maps.numpy())}
    if aupro:
        values["aupro"] = M.aupro(masks, maps.numpy(), cfg.eval.aupro_fpr_limit)
    return values


def concat(splits: list[EncodedSplit]) -> EncodedSplit:
    return EncodedSplit([torch.cat(scale) for scale in zip(*(s.features for s in splits))],
                        torch.cat([s.masks for s in splits]), torch.cat([s.labels for s in splits]))


def run_seed(args, seed: int) -> dict:
    cfg, splits, model, encoded, device = per_seed.prepared(args, seed)
    size = cfg.model.input_size
    parts = [encode(model, ImageDataset(splits.validation, size), cfg.eval.batch_size, device, desc="normals")]
    bounds = {}
    n = len(splits.validation)
    for name, spec in CANDIDATES.items():
        start = time.perf_counter()
        dataset = ImageDataset(splits.validation, size, spec, seed=seed)
        parts.append(encode(model, Subset(dataset, range(n, len(dataset))), cfg.eval.batch_size, device, desc=name))
        first = sum(len(p) for p in parts[:-1])
        bounds[name] = (first, first + len(parts[-1]))
        log.info("seed %d: encoded %s in %.1f s", seed, name, time.perf_counter() - start)
    validation = concat(parts)
    masks = validation.masks[:, 0].numpy()
    labels = validation.labels.numpy()
    test_masks, test_labels = encoded.test.masks[:, 0].numpy(), encoded.test.labels.numpy()

    history = []
    start = time.perf_counter()
    for epoch, loss in per_seed.trained_epochs(model, cfg, splits, encoded, device, seed):
        row = {"epoch": epoch, "loss": loss, "test": {}, "val": {}}
        test_maps, val_maps = maps_of(model, encoded.test, cfg, device), maps_of(model, validation, cfg, device)
        row["val_normal_loss"] = flow_outputs(model, parts[0], cfg, device).loss  # their mean NLL
        for kind in MAPS:
            row["test"][kind] = scored(test_labels, test_masks, test_maps[kind], cfg)
            row["val"][kind] = {}
            for name, (lo, hi) in bounds.items():
                pick = np.r_[0:n, lo:hi]
                row["val"][kind][name] = scored(labels[pick], masks[pick], val_maps[kind][pick], cfg, aupro=False)
        history.append(row)
        log.info("seed %d epoch %d (%.0f s): test nll %.3f, mix %.3f", seed, epoch, time.perf_counter() - start,
                 row["test"]["nll"]["image_auroc"], row["val"]["nll"]["mix s=0-1"]["image_auroc"])
        start = time.perf_counter()
    return {"seed": seed, "preset": args.preset, "category": args.category, "held_out": splits.validation_source,
            "candidates": {k: v.cache_tag() for k, v in CANDIDATES.items()}, "history": history}


def _signals(run: dict, kind: str) -> dict[str, list[float]]:
    """Per-epoch validation signals of one run: each candidate's image AUROC, and minus the held-out normals' NLL."""
    history = run["history"]
    signals = {name: [h["val"][kind][name]["image_auroc"] for h in history] for name in history[0]["val"][kind]}
    if "val_normal_loss" in history[0]:
        signals["(no anomalies) -NLL of held-out normals"] = [-h["val_normal_loss"] for h in history]
    return signals


def summarize(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("seed*.json"))]
    lines = [f"{len(runs)} seeds ({', '.join(str(r['seed']) for r in runs)}), {runs[0]['category']}, "
             f"{len(runs[0]['history'])} epochs; means over the seeds that ran the candidate [min..max]",
             "| map | validation signal | seeds | val AUROC range | epochs < .99 | Spearman(val, test image AUROC) | optimism | "
             "val AUROC mean | val pixel AUROC mean | Spearman(val, test pixel AUROC) |", "|" + "---|" * 10]
    for kind in MAPS:
        names = list(dict.fromkeys(name for run in runs for name in _signals(run, kind)))
        for name in names:
            cells = {"range": [], "below": [], "rho": [], "opt": [], "mean": [], "pix": [], "rho_pix": []}
            seeds = 0
            for run in runs:
                val = _signals(run, kind).get(name)
                if val is None:
                    continue
                seeds += 1
                test = [h["test"][kind]["image_auroc"] for h in run["history"]]
                f = fidelity(val, test)
                is_auroc = not name.startswith("(")
                cells["range"].append(max(val) - min(val) if is_auroc else math.nan)
                cells["below"].append(sum(v < 0.99 for v in val) / len(val) if is_auroc else math.nan)
                cells["rho"].append(f.spearman)
                cells["opt"].append(f.optimism)
                cells["mean"].append(statistics.mean(val) if is_auroc else math.nan)
                cells["pix"].append(statistics.mean(h["val"][kind][name]["pixel_auroc"] for h in run["history"])
                                    if is_auroc else math.nan)
                cells["rho_pix"].append(fidelity(val, [h["test"][kind]["pixel_auroc"] for h in run["history"]]).spearman)

            def fmt(values):
                finite = [v for v in values if not math.isnan(v)]
                if not finite:
                    return "n/a"
                return f"{statistics.mean(finite):.3f} [{min(finite):.2f}..{max(finite):.2f}]"

            lines.append(f"| {kind} | {name} | {seeds} | " + " | ".join(fmt(cells[k]) for k in cells) + " |")
    for kind in MAPS:
        tests = [[h["test"][kind]["image_auroc"] for h in r["history"]] for r in runs]
        lines.append(f"test image AUROC ({kind}) per seed: min/max over epochs "
                     + ", ".join(f"{min(t):.3f}/{max(t):.3f}" for t in tests)
                     + "; per epoch (seed " + str(runs[0]["seed"]) + "): " + " ".join(f"{v:.3f}" for v in tests[0]))
    return "\n".join(lines)


if __name__ == "__main__":
    per_seed.main(__doc__, "/tmp/valexp", run_seed, summarize)
