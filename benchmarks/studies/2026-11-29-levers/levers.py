"""Levers of the image score, the map, the validation set and the epoch choice, from one training per seed.

`train` trains a preset (plus `--set` overrides: training levers such as input size or flow steps) once per seed,
exactly as `fastflow train` does, and after every epoch saves what the flows output for the test split and the
validation split (held-out normals + synthetic anomalies): per-scale z2 and NLL maps at the flows' resolution and
the per-scale image NLL, in `<dump>/seed<S>/epoch<E>.pt`, with `<dump>/seed<S>/meta.pt` (labels, masks, which
anomaly type each validation row carries and its source normal). `table` then scores every variant from those
outputs with the project's own scoring code (`fastflow.scoring`: held-out normal statistics, leave-one-out
validation scores, fusion, image scores), so a new score or selection rule costs seconds, not a training:

  nice python benchmarks/studies/2026-11-29-levers/levers.py train --config experiments/efficientnet_lite0.yaml \\
      --set data.root=../shared/data/mvtec_screw --set data.category=screw --epochs 10 --dump /tmp/screw-base
  python benchmarks/studies/2026-11-29-levers/levers.py table /tmp/screw-base [/tmp/tire-base ...] [--scores max mean] [--json out.json]

Test labels are used only for the reported test metrics; `val` columns and the leak-free epoch use none.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository: fastflow
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/: per_seed.py

from fastflow.core import metrics as M  # noqa: E402
from fastflow.core.anomaly_map import scale_maps  # noqa: E402
from fastflow.core.model import FastFlow  # noqa: E402
from fastflow.core.scoring import (ScoreSettings, cross_fitted, image_nll, normal_stats,  # noqa: E402
                                   off_defect_scores, score_scales)
from fastflow.data.anomalies import anomaly_kind  # noqa: E402
from fastflow.data.dataset import anomaly_spec, make_splits, source_of  # noqa: E402
from fastflow.data.features import EncodedSplit  # noqa: E402
from fastflow.engine.encode import encode_splits  # noqa: E402
from fastflow.engine.train import seed_everything  # noqa: E402
from fastflow.runtime.config import load_config  # noqa: E402

from per_seed import trained_epochs  # noqa: E402

MAPS = ("z2", "nll")
NORMS = ("none", "scale", "position")
SCORES = ("max", "topk", "mean", "nll", "nll_z")
NLL_SCORES = ("nll", "nll_z")
RULES = ("val", "val-1se", "last", "test")  # leak-free: the best validation epoch, the earliest within one standard
# error of it; the fixed last epoch; the test-best epoch (reference only)


# ------------------------------------------------------------------ training with saved outputs


@torch.inference_mode()
def flow_outputs(model, split: EncodedSplit, batch_size: int) -> dict:
    """Per-scale maps of both kinds `[(N,1,h,w)]` and per-scale image NLL `(N, n_scales)`, on the CPU."""
    model.eval()
    maps, nll = {kind: [] for kind in MAPS}, []
    for start in range(0, len(split), batch_size):
        latents, log_jacs = model.forward_features(split.batch(torch.arange(start, min(start + batch_size, len(split))),
                                                               torch.device("cpu")))
        for kind in MAPS:
            maps[kind].append(scale_maps(kind, latents, log_jacs))
        nll.append(image_nll(latents, log_jacs))
    return {**{kind: [torch.cat(s) for s in zip(*maps[kind])] for kind in MAPS}, "image_nll": torch.cat(nll)}


def validation_kinds(cfg, n_normals: int, n_rows: int) -> list[str]:
    """The anomaly type of every validation row ('good' for the held-out normals), as `ImageDataset` makes them."""
    spec = anomaly_spec(cfg.data)
    return ["good" if row < n_normals else anomaly_kind(spec, row - n_normals, n_normals) for row in range(n_rows)]


def train(args: argparse.Namespace) -> None:
    for seed in args.seeds:
        out = args.dump / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        cfg = load_config(Path(args.config), [*args.set, f"train.seed={seed}", f"train.epochs={args.epochs}",
                                              "train.num_threads=1", "tracking.enabled=false",
                                              f"train.cache_dir={args.cache_dir}"])
        seed_everything(seed)
        torch.set_num_threads(1)
        splits = make_splits(cfg.data, cfg.train.max_train_images, seed)
        model = FastFlow(cfg.model)
        encoded = encode_splits(model, cfg, splits, torch.device("cpu"))
        n_normals, n_rows = len(splits.validation), len(encoded.validation)
        torch.save({"config": args.config, "set": args.set, "test_labels": encoded.test.labels,
                    "test_masks": encoded.test.masks, "test_defects": [s.defect for s in splits.test],
                    "val_labels": encoded.validation.labels, "val_masks": encoded.validation.masks,
                    "val_kinds": validation_kinds(cfg, n_normals, n_rows),
                    "val_sources": [source_of(row, n_normals) for row in range(n_rows)],
                    "input_size": cfg.model.input_size, "topk_fraction": cfg.model.topk_fraction}, out / "meta.pt")
        net = model
        for epoch, loss in trained_epochs(model, cfg, splits, encoded, torch.device("cpu"), seed):
            start = time.perf_counter()
            outputs = {"loss": loss, "test": flow_outputs(net, encoded.test, cfg.eval.batch_size),
                       "validation": flow_outputs(net, encoded.validation, cfg.eval.batch_size)}
            torch.save(outputs, out / f"epoch{epoch}.pt")
            logging.info("seed %d epoch %d: loss %.3f, outputs saved in %.0f s", seed, epoch, loss,
                         time.perf_counter() - start)


# ------------------------------------------------------------------ scoring the saved outputs


@dataclass(frozen=True)
class Variant:
    """One way to score: the map kind, the output map's standardisation, the map the score reads, the score."""
    map: str
    map_norm: str
    score_norm: str
    score: str

    @property
    def name(self) -> str:
        read = "" if self.score_norm in ("map", self.map_norm) else f" on {self.score_norm}-std map"
        return f"{self.map}/{self.map_norm}: {self.score}{read}"


def variants(scores: tuple[str, ...]) -> list[Variant]:
    """Every map kind and standardisation with every map score, and the image-NLL scores."""
    found = [Variant(kind, norm, "map", s) for kind in MAPS for norm in NORMS for s in scores if s not in NLL_SCORES]
    return found + [Variant("nll", "none", "map", s) for s in scores if s in NLL_SCORES]


def with_raw_map(rows: dict) -> dict:
    """`model.score_norm` variants, derived: the image score of the standardised map, the pixel metrics of the raw
    output map (`map_norm: none`), both measured already. {variant: row} -> the same with them added."""
    derived = {}
    for name, row in rows.items():
        variant = Variant(*row["key"])
        if variant.map_norm != "none" and variant.score not in NLL_SCORES:
            raw = rows[Variant(variant.map, "none", "map", variant.score).name]
            read = Variant(variant.map, "none", variant.map_norm, variant.score)
            derived[read.name] = {**row, "key": list(read.__dict__.values()), "pixel_auroc": raw["pixel_auroc"],
                                  "aupro": raw["aupro"]}
    return {**rows, **derived}


def score_epoch(outputs: dict, meta: dict, chosen: list[Variant]) -> list[dict]:
    """Test and leave-one-out validation image AUROC of every variant; pixel AUROC/AUPRO of every output map."""
    size = (meta["input_size"], meta["input_size"])
    test, val = outputs["test"], outputs["validation"]
    val_labels = meta["val_labels"]
    normal = torch.nonzero(val_labels == 0).flatten()
    sources = torch.tensor(meta["val_sources"])
    test_labels = meta["test_labels"].numpy()
    kinds = np.array(meta["val_kinds"])
    rows, pixel = [], {}
    for variant in chosen:
        stats = normal_stats([m[normal] for m in val[variant.map]], val["image_nll"][normal])
        settings = ScoreSettings(variant.map, variant.map_norm, variant.score, meta["topk_fraction"],
                                 variant.score_norm)
        fused, read, test_scores = score_scales(test[variant.map], test["image_nll"], size, settings, stats)
        off_defect = off_defect_scores(read, meta["test_masks"], settings)
        _, _, val_scores = cross_fitted(val[variant.map], val["image_nll"], normal, sources, size, settings)
        val_scores = val_scores.numpy()
        row = {"variant": variant.name, "key": list(variant.__dict__.values()), "image_auroc": M.image_auroc(test_labels, test_scores.numpy()),
               "val_image_auroc": M.image_auroc(val_labels.numpy(), val_scores),
               M.OFF_DEFECT: float("nan") if off_defect is None else M.image_auroc(test_labels, off_defect.numpy())}
        for kind in sorted(set(kinds) - {"good"}):  # validation AUROC of each anomaly type alone
            keep = (kinds == "good") | (kinds == kind)
            row[f"val_{kind}"] = M.image_auroc(val_labels.numpy()[keep], val_scores[keep])
        key = (variant.map, variant.map_norm)
        if key not in pixel:
            masks, maps = meta["test_masks"][:, 0].numpy(), fused[:, 0].numpy()
            pixel[key] = {"pixel_auroc": M.pixel_auroc(masks, maps), "aupro": M.aupro(masks, maps, 0.3)}
        rows.append({**row, **pixel[key]})
    return rows


def scored(dump: Path, chosen: list[Variant]) -> dict:
    """{seed: {epoch: [row per variant]}}, from `<dump>/scores.json` where it already holds them."""
    cache_path = dump / "scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for seed_dir in sorted(dump.glob("seed*")):
        meta = torch.load(seed_dir / "meta.pt", weights_only=True)
        for path in sorted(seed_dir.glob("epoch*.pt"), key=lambda p: int(p.stem[5:])):
            key = f"{seed_dir.name}/{path.stem}"
            done = {r["variant"] for r in cache.get(key, []) if M.OFF_DEFECT in r}  # rows of every current column
            todo = [v for v in chosen if v.name not in done]
            if todo:
                outputs = torch.load(path, weights_only=True)
                kept = [r for r in cache.get(key, []) if r["variant"] not in {v.name for v in todo}]
                cache[key] = kept + [{**r, "loss": outputs["loss"]} for r in score_epoch(outputs, meta, todo)]
                cache_path.write_text(json.dumps(cache))
    result: dict = defaultdict(dict)
    for key, rows in cache.items():
        seed, epoch = key.split("/")
        result[int(seed[4:])][int(epoch[5:])] = with_raw_map({r["variant"]: r for r in rows})
    return result


def auroc_se(auroc: float, n_anomalous: int, n_normal: int) -> float:
    """The closed-form standard error of an AUROC (Hanley & McNeil 1982)."""
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    return float(np.sqrt(max(auroc * (1 - auroc) + (n_anomalous - 1) * (q1 - auroc**2)
                             + (n_normal - 1) * (q2 - auroc**2), 0.0) / (n_anomalous * n_normal)))


def chosen_epoch(epochs: dict, variant: str, rule: str, metric: str = "val_image_auroc",
                 counts: tuple[int, int] = (1, 1)) -> int:
    """The epoch a rule picks: best `metric` (ties: the later epoch); the earliest epoch within one standard error
    of that best (`counts`: the validation's anomalous and normal images); the last; or the test-best."""
    if rule == "last":
        return max(epochs)
    key = metric if rule in ("val", "val-1se") else "image_auroc"
    best = max(epochs, key=lambda e: (epochs[e][variant][key], e))
    if rule != "val-1se":
        return best
    floor = epochs[best][variant][key] - auroc_se(epochs[best][variant][key], *counts)
    return min(e for e in epochs if epochs[e][variant][key] >= floor)


def summary(result: dict, variant: str, rule_metric: str = "val_image_auroc", counts: tuple[int, int] = (1, 1)) -> dict:
    """Mean and sd over seeds of the test figures at each rule's epoch, the fall from the peak, and Spearman."""
    from scipy.stats import spearmanr

    cols = defaultdict(list)
    for seed, epochs in result.items():
        for rule in RULES:
            epoch = chosen_epoch(epochs, variant, rule, rule_metric, counts)
            cols[f"img {rule}"].append(epochs[epoch][variant]["image_auroc"])
            cols[f"px {rule}"].append(epochs[epoch][variant]["pixel_auroc"])
            cols[f"aupro {rule}"].append(epochs[epoch][variant]["aupro"])
            cols[f"off {rule}"].append(epochs[epoch][variant].get(M.OFF_DEFECT, float("nan")))
            cols[f"epoch {rule}"].append(epoch)
        curve = [epochs[e][variant]["image_auroc"] for e in sorted(epochs)]
        peak = int(np.argmax(curve))
        cols["fall"].append(curve[peak] - min(curve[peak:]))
        val = [epochs[e][variant][rule_metric] for e in sorted(epochs)]
        cols["spearman"].append(float(spearmanr(val, curve).statistic) if len(set(val)) > 1 else float("nan"))
        cols["val range"].append(max(val) - min(val))
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0) for k, v in cols.items()}


def table(args: argparse.Namespace) -> None:
    chosen = variants(tuple(args.scores))
    fmt = lambda m: f"{m[0]:.3f}±{m[1]:.3f}"
    out = {}
    for dump in args.dumps:
        result = scored(dump, chosen)
        seeds, epochs = sorted(result), min(len(e) for e in result.values())
        print(f"\n### {dump.name}: seeds {seeds}, epochs 1-{epochs}; test image AUROC at the epoch chosen by the "
              "leak-free validation AUROC (val), the last epoch (last) and the test set (test, reference only)\n")
        meta = torch.load(next(dump.glob("seed*")) / "meta.pt", weights_only=True)
        kinds = meta["val_kinds"]
        subset = args.rule_metric.removeprefix("val_") if args.rule_metric != "val_image_auroc" else None
        counts = (sum(k != "good" and (subset is None or k == subset) for k in kinds), kinds.count("good"))
        columns = ("img val", "img val-1se", "img last", "img test", "px val", "aupro val", "px val-1se", "fall",
                   "spearman", "val range", "off val", "off test")
        print("| variant | " + " | ".join(columns) + " |")
        print("|" + "---|" * (len(columns) + 1))
        for name in sorted(next(iter(next(iter(result.values())).values()))):
            s = summary(result, name, args.rule_metric, counts)
            out[f"{dump.name}/{name}"] = s
            print(f"| {name} | " + " | ".join(fmt(s[k]) for k in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train")
    run.add_argument("--config", default="experiments/efficientnet_lite0.yaml")
    run.add_argument("--set", action="append", default=[])
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--epochs", type=int, default=10)
    run.add_argument("--cache-dir", default=".cache/features")
    run.add_argument("--dump", type=Path, required=True)
    show = commands.add_parser("table")
    show.add_argument("dumps", type=Path, nargs="+")
    show.add_argument("--scores", nargs="+", default=list(SCORES))
    show.add_argument("--rule-metric", default="val_image_auroc", help="validation metric of the leak-free epoch")
    show.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    train(args) if args.command == "train" else table(args)


if __name__ == "__main__":
    main()
