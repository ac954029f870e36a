"""This project's FastFlow and anomalib's, side by side per epoch: same data, backbone weights, input size, flow
settings and epochs, several seeds; image and pixel AUROC after every epoch, scored with the project's metric code.

  nice python benchmarks/side_by_side.py --root ../shared/data/mvtec_screw --category screw --seeds 0 1 2 \\
      --epochs 10 --out benchmarks/studies/2026-12-02-screw-side-by-side/side_by_side_screw.md [--log-mlflow]

Per seed: the project trains the preset with `fastflow.train.train_and_evaluate` (leak-free selection: held-out
normals + synthetic anomalies; test figures after every epoch); anomalib 2.7.0 (`anomalib_side.py`, in its own venv,
see benchmark.py) trains its `FastflowModel` on exactly the same training tensors (the project's training split, the
held-out normals excluded), with the same backbone weights, seed and settings, and saves its test maps after every
epoch. anomalib has no validation set: like its published numbers (early stopping on the test set) its epoch is the
test-best one, i.e. the test-set protocol. Timing: each side's training seconds per epoch, measured on the same
machine in the same process tree (run nothing else heavy meanwhile; compare ratios, not seconds).
With `--log-mlflow`, both sides' seeds are logged as runs (anomalib's with tag `implementation`) for `fastflow report`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastflow.core import metrics as M  # noqa: E402
from fastflow.core.backbone import full_model_state  # noqa: E402
from fastflow.data.dataset import dataset_hash, make_splits  # noqa: E402
from fastflow.engine.protocol import LEAK_FREE, PAPER  # noqa: E402
from fastflow.engine.train import train_and_evaluate  # noqa: E402
from fastflow.runtime.config import flatten, load_config  # noqa: E402

from benchmark import ANOMALIB_VENV, ensure_anomalib_venv, load_split, run_anomalib  # noqa: E402

IMPLEMENTATION = "anomalib 2.7.0"


def our_side(cfg, log_mlflow: bool = False) -> dict:
    """The project's run: per-epoch test and validation figures, training seconds per epoch, the leak-free epoch.
    With `log_mlflow`, a tracked run like `fastflow train`'s (what `fastflow report` reads)."""
    start = time.perf_counter()
    if log_mlflow:
        from fastflow.tracking.runs import start_run

        with start_run(replace(cfg, tracking=replace(cfg.tracking, enabled=True))) as tracker:
            result = train_and_evaluate(cfg, tracker)
    else:
        result = train_and_evaluate(cfg)
    rows = {h["epoch"]: {k: h[f"eval/{k}"] for k in ("image_auroc", "pixel_auroc", "aupro", "val_image_auroc")
                         if f"eval/{k}" in h} | {"train_s": h["train/epoch_seconds"]} for h in result.history}
    return {"epochs": rows, "chosen": result.best_epoch, "wall_s": time.perf_counter() - start,
            "intervals": {k: result.best_metrics[f"eval/{k}"] for k in ("image_auroc_ci_low", "image_auroc_ci_high")}}


def anomalib_side(cfg, splits, python: Path, workdir: Path) -> dict:
    """anomalib on the same training tensors; its per-epoch test maps scored here, then deleted."""
    size = cfg.model.input_size
    train, _, _ = load_split(splits.train, size)
    test, masks, labels = load_split(splits.test, size)
    state = {"state_dict": {"mean": torch.tensor(cfg.model.mean).view(1, 3, 1, 1),
                            "std": torch.tensor(cfg.model.std).view(1, 3, 1, 1)}}
    backbone = full_model_state(cfg.model.backbone, cfg.model.weights)
    side = run_anomalib(python, cfg, state, train, test, workdir, threads=1, device=torch.device("cpu"),
                        extra_spec={"every_epoch": True}, backbone=backbone)
    rows = {}
    for epoch in range(1, cfg.train.epochs + 1):
        path = workdir / f"anomalib_maps_epoch{epoch}.npz"
        with np.load(path) as saved:
            maps, scores = saved["maps"], saved["scores"]
        rows[epoch] = {"image_auroc": M.image_auroc(labels, scores), "train_s": side["epoch_seconds"][epoch - 1],
                       **{k: v for k, v in M.evaluate(labels, scores, masks[:, 0].numpy(), maps).items()
                          if k in ("pixel_auroc", "aupro")}}
        rows[epoch]["_scores"] = scores.tolist()
        rows[epoch]["_counts"] = [c.tolist() for c in M.pixel_counts(masks[:, 0].numpy(), maps)]  # JSON
        path.unlink()
    return {"epochs": rows, "labels": labels.tolist(), "images": [f"{s.defect}/{s.image.name}" for s in splits.test]}


def log_anomalib_runs(cfg, splits, seeds: dict[int, dict]) -> None:
    """Each anomalib seed as a FINISHED run at its test-best epoch (the test-set protocol anomalib publishes with)."""
    from fastflow.tracking.runs import log_peer_run

    for seed, side in seeds.items():
        epoch = max(side["epochs"], key=lambda e: side["epochs"][e]["image_auroc"])
        best = side["epochs"][epoch]
        low, high = M.image_auroc_interval(np.array(side["labels"]), np.array(best["_scores"]))
        params = {k: v for k, v in flatten(cfg).items() if not k.startswith("data.val")}
        log_peer_run(cfg.tracking.experiment, f"anomalib-{cfg.data.category}-seed{seed}",
                     tags={"category": cfg.data.category, "backbone": cfg.model.backbone,
                           "implementation": IMPLEMENTATION, "selection_metric": PAPER.metric,
                           "selection_protocol": PAPER.label, "data_hash": dataset_hash(splits.train + splits.validation + splits.test)},
                     params={**params, "train.seed": seed},
                     metrics={"best/epoch": epoch, **{f"best/{k}": best[k] for k in ("image_auroc", "pixel_auroc",
                                                                                       "aupro")},
                              "best/image_auroc_ci_low": low, "best/image_auroc_ci_high": high},
                     history={e: {k: r[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
                              for e, r in side["epochs"].items()},
                     test_scores={"images": side["images"], "labels": side["labels"], "scores": best["_scores"]},
                     pixel_counts=tuple(np.array(c) for c in best["_counts"]))


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f}±{np.std(values, ddof=1) if len(values) > 1 else 0:.3f}"


def table(results: dict, epochs: int) -> str:
    """Markdown: per epoch, mean ± sd over seeds of both sides' test image/pixel AUROC; then each side's choice."""
    seeds = sorted(results)
    lines = [f"Seeds {seeds}; mean ± sd over seeds. Test image / pixel AUROC after each epoch (the same test images "
             "and metric code for both); `val` = the project's leak-free validation image AUROC (held-out normals + "
             "synthetic anomalies); train s = training seconds per epoch.", "",
             "| epoch | anomalib image | anomalib pixel | anomalib train s | ours image | ours pixel | ours val | "
             "ours train s |", "|" + "---|" * 8]
    for epoch in range(1, epochs + 1):
        a = [results[s]["anomalib"]["epochs"][epoch] for s in seeds]
        o = [results[s]["ours"]["epochs"][epoch] for s in seeds]
        lines.append(f"| {epoch} | {fmt([r['image_auroc'] for r in a])} | {fmt([r['pixel_auroc'] for r in a])} | "
                     f"{fmt([r['train_s'] for r in a])} | {fmt([r['image_auroc'] for r in o])} | "
                     f"{fmt([r['pixel_auroc'] for r in o])} | {fmt([r['val_image_auroc'] for r in o])} | "
                     f"{fmt([r['train_s'] for r in o])} |")
    test_best = lambda side: max(side["epochs"], key=lambda e: side["epochs"][e]["image_auroc"])
    lines += ["", "| side, epoch chosen by | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|"]
    for name, rule, label in (("anomalib", test_best, f"anomalib, test-best epoch ({PAPER.label})"),
                              ("ours", lambda side: side["chosen"], f"ours, {LEAK_FREE.label}"),
                              ("ours", test_best, f"ours, test-best epoch ({PAPER.label}; reference)")):
        rows = [results[s][name]["epochs"][rule(results[s][name])] for s in seeds]
        lines.append(f"| {label} | {fmt([r['image_auroc'] for r in rows])} | {fmt([r['pixel_auroc'] for r in rows])} "
                     f"| {fmt([r['aupro'] for r in rows])} |")
    ratio = np.mean([results[s]["anomalib"]["epochs"][e]["train_s"] / results[s]["ours"]["epochs"][e]["train_s"]
                     for s in seeds for e in range(2, epochs + 1)])
    lines += ["", f"Training time per epoch, anomalib / ours (epochs 2-{epochs}, mean over seeds): {ratio:.2f}x "
                  "(anomalib runs the frozen backbone every epoch; the project caches its features)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/data/mvtec_screw")
    parser.add_argument("--category", default="screw")
    parser.add_argument("--preset", default="experiments/efficientnet_lite0.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/side_by_side"),
                        help="scratch folder; seeds.json there keeps finished seeds (delete it to start afresh)")
    parser.add_argument("--out", type=Path, required=True, help="markdown table (and <out>.json with the raw rows)")
    parser.add_argument("--log-mlflow", action="store_true", help="log both sides' seeds as runs for `fastflow report`")
    parser.add_argument("--anomalib-python", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    python = args.anomalib_python or ensure_anomalib_venv(ANOMALIB_VENV)
    done_path = args.work / "seeds.json"  # each finished seed, so that a stopped run resumes where it stopped
    done = {int(k): v for k, v in json.loads(done_path.read_text()).items()} if done_path.exists() else {}
    results = {}
    for seed in args.seeds:
        cfg = load_config(Path(args.preset), [f"data.root={args.root}", f"data.category={args.category}",
                                              f"train.epochs={args.epochs}", f"train.seed={seed}", "eval.eval_every=1",
                                              "train.num_threads=1", "tracking.enabled=false",
                                              f"tracking.run_name=ours-{args.category}-seed{seed}", *args.set])
        if seed in done:
            results[seed] = {side: {**r, "epochs": {int(e): row for e, row in r["epochs"].items()}}
                             for side, r in done[seed].items()}
            print(f"seed {seed}: already done ({done_path})", flush=True)
            continue
        splits = make_splits(cfg.data, cfg.train.max_train_images, seed)  # what train_and_evaluate trains on
        results[seed] = {"ours": our_side(cfg, args.log_mlflow),
                         "anomalib": anomalib_side(cfg, splits, python, args.work / f"seed{seed}")}
        if args.log_mlflow:
            log_anomalib_runs(cfg, splits, {seed: results[seed]["anomalib"]})
        done[seed] = results[seed]
        done_path.parent.mkdir(parents=True, exist_ok=True)
        done_path.write_text(json.dumps(done))
        print(f"seed {seed} done", flush=True)
    text = table(results, args.epochs)
    args.out.write_text(text + "\n")
    raw = {s: {side: {k: v for k, v in r[side].items()} for side in r} for s, r in results.items()}
    for r in raw.values():
        r["anomalib"]["epochs"] = {e: {k: v for k, v in row.items() if not k.startswith("_")}
                                   for e, row in r["anomalib"]["epochs"].items()}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(text)


if __name__ == "__main__":
    main()
