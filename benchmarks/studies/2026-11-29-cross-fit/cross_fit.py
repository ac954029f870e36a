#!/usr/bin/env python
"""Does scoring the validation set with leave-one-out statistics make leak-free selection follow the test set?

With `score_norm`/`map_norm`/`nll_z`, scores are standardised with statistics of the held-out normals. The
validation set is made of those same normals and anomalous copies of them, so scored with statistics that
include each image itself its normals look more normal than a new part does. `fastflow.scoring.cross_fitted`
scores each held-out row with the statistics of the *other* held-out normals. One training per seed; at every
epoch the validation set is scored both ways (and with more anomalous copies), the test set with the statistics
of all held-out normals, as in a run.

    PYTHONPATH=. .venv/bin/python benchmarks/studies/2026-11-29-cross-fit/cross_fit.py --root ../shared/data/mvtec3d_tire --category tire \
        --seeds 0 1 2 --out /tmp/crossfit

Writes `<out>/seed<N>.json` per seed and prints the table (`--summarize`: only the table).
Protocol of every number: validation = held-out normals + synthetic anomalies; test = the real test set.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import statistics
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/: per_seed.py

import per_seed  # noqa: E402  (benchmarks/per_seed.py)

import torch  # noqa: E402

from fastflow.data.dataset import ImageDataset, anomaly_spec  # noqa: E402
from fastflow.data.features import encode  # noqa: E402
from fastflow.engine.evaluate import evaluate_split, flow_outputs, held_out_stats  # noqa: E402
from fastflow.engine.selection import fidelity, split_half_reliability  # noqa: E402

log = logging.getLogger("cross_fit")
COPIES = (2, 6)  # the old default, and the new one: three times as many anomalous copies (less noise)


def run_seed(args, seed: int) -> dict:
    cfg, splits, model, encoded, device = per_seed.prepared(args, seed)
    validations = {}
    for copies in COPIES:
        dataset = ImageDataset(splits.validation, cfg.model.input_size, replace(anomaly_spec(cfg.data), copies=copies),
                               seed=seed)
        validations[copies] = encode(model, dataset, cfg.eval.batch_size, device, desc=f"{copies} copies")

    history = []
    start = time.perf_counter()
    for epoch, loss in per_seed.trained_epochs(model, cfg, splits, encoded, device, seed):
        stats = held_out_stats(flow_outputs(model, validations[COPIES[0]], cfg, device), validations[COPIES[0]].labels)
        tested = evaluate_split(model, encoded.test, cfg, device, stats=stats)
        test = tested.metrics
        row = {"epoch": epoch, "loss": loss, "test": {k: test[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
               "val": {}, "test_scores": tested.scores.tolist()}
        for copies, split in validations.items():
            for cross_fit in (False, True):
                values = evaluate_split(model, split, cfg, device, stats=stats, cross_fit=cross_fit)
                name = f"{'leave-one-out' if cross_fit else 'in-sample'} stats, {copies} copies"
                row["val"][name] = {k: values.metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
                threshold = float(torch.quantile(torch.from_numpy(values.normal_scores()), cfg.eval.val_quantile))
                # the stored threshold on the test set: false alarms on good parts (target 1 - val_quantile), recall
                row["val"][name]["test_fpr"] = float((tested.normal_scores() >= threshold).mean())
                row["val"][name]["test_recall"] = float((tested.scores[tested.labels == 1] >= threshold).mean())
        history.append(row)
        log.info("seed %d epoch %d (%.0f s): test %.3f, val in-sample %.3f, leave-one-out %.3f", seed, epoch,
                 time.perf_counter() - start, row["test"]["image_auroc"],
                 row["val"]["in-sample stats, 2 copies"]["image_auroc"],
                 row["val"]["leave-one-out stats, 2 copies"]["image_auroc"])
        start = time.perf_counter()
    return {"seed": seed, "preset": args.preset, "category": args.category, "held_out": splits.validation_source,
            "anomalies": anomaly_spec(cfg.data).cache_tag(), "test_labels": encoded.test.labels.tolist(),
            "history": history}


def summarize(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("seed*.json"))]
    lines = [f"{len(runs)} seeds ({', '.join(str(r['seed']) for r in runs)}), {runs[0]['category']}, "
             f"{runs[0]['preset']}, {len(runs[0]['history'])} epochs; mean ± sd over seeds [per seed]",
             "| validation scored with | val image AUROC range | epochs < .99 | Spearman(val, test image AUROC) | "
             "optimism | test image AUROC at the val-chosen epoch | stored threshold there: false alarms on test good | "
             "recall on test defects |", "|---|---|---|---|---|---|---|---|"]

    def cell(values, digits=3):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f} [{' / '.join(f'{v:+.2f}' for v in values)}]"

    for name in runs[0]["history"][0]["val"]:
        ranges, below, rho, optimism, chosen, fpr, recall = [], [], [], [], [], [], []
        for run in runs:
            val = [h["val"][name]["image_auroc"] for h in run["history"]]
            test = [h["test"]["image_auroc"] for h in run["history"]]
            f = fidelity(val, test)
            ranges.append(max(val) - min(val))
            below.append(sum(v < 0.99 for v in val) / len(val))
            rho.append(f.spearman)
            optimism.append(f.optimism)
            chosen.append(max(test) - f.optimism)
            picked = run["history"][val.index(max(val))]["val"][name]  # the epoch the validation score chooses
            fpr.append(picked["test_fpr"])
            recall.append(picked["test_recall"])
        lines.append(f"| {name} | {cell(ranges)} | {statistics.mean(below):.0%} | {cell(rho, 2)} | {cell(optimism)} "
                     f"| {cell(chosen)} | {cell(fpr)} | {cell(recall)} |")
    lines.append("Test split-half reliability over the epochs (fastflow.selection.split_half_reliability: Spearman of "
                 "the epochs' test image AUROC between two label-stratified halves of the test set, mean of 50 "
                 "splits; near 0 or below: the test set cannot rank the epochs): "
                 + ", ".join(f"seed {r['seed']} {split_half_reliability(r['test_labels'], [h['test_scores'] for h in r['history']]):+.2f}"
                             for r in runs))
    for run in runs:
        lines.append(f"seed {run['seed']}: test image AUROC per epoch "
                     + " ".join(f"{h['test']['image_auroc']:.3f}" for h in run["history"])
                     + "; leave-one-out val (2 copies) "
                     + " ".join(f"{h['val']['leave-one-out stats, 2 copies']['image_auroc']:.3f}" for h in run["history"])
                     + "; in-sample val " + " ".join(f"{h['val']['in-sample stats, 2 copies']['image_auroc']:.3f}"
                                                     for h in run["history"]))
    return "\n".join(lines)


if __name__ == "__main__":
    per_seed.main(__doc__, "/tmp/crossfit", run_seed, summarize)
