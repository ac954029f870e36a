"""Issue 11: every image-score / map-normalisation variant, for raw and EMA flow weights, at every epoch.

One training per seed (seeds trained round-robin, one epoch each in turn, so that a run cut short still
holds the same epochs for every seed). At each epoch, for the raw weights and their EMA, the test split and
the validation split (held-out normals + synthetic defects) go through the flows once; every variant is
post-processing of those outputs (fastflow.scoring). Normal statistics come only from the validation
split's clean held-out normals. One JSON line per (seed, epoch, weights, map, norm, score):

  nice -n 5 python benchmarks/levers.py --config experiments/efficientnet_lite0.yaml \
      --set data.root=../shared/data/mvtec3d_tire --set data.category=tire --epochs 20 --out /tmp/levers.jsonl
  python benchmarks/levers.py --summarise /tmp/levers.jsonl

Test labels are used only to compute the reported test metrics; the `val_image_auroc` column is the
leak-free selection signal (protocol names: fastflow.protocol).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastflow import metrics as M  # noqa: E402
from fastflow.config import load_config  # noqa: E402
from fastflow.data import make_splits  # noqa: E402
from fastflow.ema import ema_decay, make_ema  # noqa: E402
from fastflow.features import EncodedSplit  # noqa: E402
from fastflow.model import FastFlow  # noqa: E402
from fastflow.protocol import LEAK_FREE, PAPER  # noqa: E402
from fastflow.anomaly_map import fuse, image_score as map_image_score, scale_maps  # noqa: E402
from fastflow.scoring import image_nll, nll_image_score, normal_stats, standardise  # noqa: E402
from fastflow.train import _train_batches, encode_splits, make_optimizer, seed_everything, train_epoch  # noqa: E402

MAPS = ("z2", "nll")
NORMS = ("none", "scale", "position")
MAP_SCORES = ("max", "topk", "mean")


@torch.inference_mode()
def flow_outputs(model, split: EncodedSplit, batch_size: int) -> dict:
    """Per-scale maps of both kinds (native resolution) and the per-scale image NLL of every image."""
    model.eval()
    out = {kind: [] for kind in MAPS}
    nll = []
    for start in range(0, len(split), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(split)))
        latents, log_jacs = model.forward_features(split.batch(indices, torch.device("cpu")))
        for kind in MAPS:
            out[kind].append(scale_maps(kind, latents, log_jacs))
        nll.append(image_nll(latents, log_jacs))
    return {**{kind: [torch.cat(s) for s in zip(*out[kind])] for kind in MAPS}, "image_nll": torch.cat(nll)}


def border_fraction(maps: torch.Tensor, band: int) -> float:
    """Fraction of images whose map maximum lies within `band` pixels of the border."""
    b, _, h, w = maps.shape
    idx = maps.flatten(start_dim=1).argmax(dim=1)
    y, x = idx // w, idx % w
    near = (y < band) | (y >= h - band) | (x < band) | (x >= w - band)
    return float(near.float().mean())


def evaluate_variants(test_out: dict, val_out: dict, test: EncodedSplit, val: EncodedSplit, size: int,
                      topk: float, fpr_limit: float, pixel: bool) -> list[dict]:
    rows = []
    t_labels, v_labels = test.labels.numpy(), val.labels.numpy()
    normal = val.labels == 0  # clean held-out normals: the only images statistics come from
    test_good = torch.from_numpy(t_labels == 0)
    masks = test.masks[:, 0].numpy()
    band = size // 16  # one cell of the coarsest (stride-16) scale
    for kind in MAPS:
        stats = normal_stats([m[normal] for m in val_out[kind]], val_out["image_nll"][normal])
        for norm in NORMS:
            fused_test = fuse(standardise(test_out[kind], norm, stats), (size, size))
            fused_val = fuse(standardise(val_out[kind], norm, stats), (size, size))
            extra = {"border_max_fraction": border_fraction(fused_test[test_good], band)}
            if pixel:
                extra["pixel_auroc"] = M.pixel_auroc(masks, fused_test[:, 0].numpy())
                extra["aupro"] = M.aupro(masks, fused_test[:, 0].numpy(), fpr_limit)
            for mode in MAP_SCORES:
                rows.append({"map": kind, "norm": norm, "score": mode,
                             "image_auroc": M.image_auroc(t_labels, map_image_score(fused_test, mode, topk).numpy()),
                             "val_image_auroc": M.image_auroc(v_labels, map_image_score(fused_val, mode, topk).numpy()),
                             **extra})
        if kind == "nll":  # the image NLL scores do not depend on the map
            for mode in ("nll", "nll_z"):
                rows.append({"map": "-", "norm": "-", "score": mode,
                             "image_auroc": M.image_auroc(t_labels, nll_image_score(test_out["image_nll"], mode, stats).numpy()),
                             "val_image_auroc": M.image_auroc(v_labels, nll_image_score(val_out["image_nll"], mode, stats).numpy())})
    return rows


def run(args: argparse.Namespace) -> None:
    base = load_config(Path(args.config), [*args.set, f"train.epochs={args.epochs}", "train.num_threads=1",
                                           "tracking.enabled=false", "train.feature_cache=disk",
                                           f"train.cache_dir={args.cache_dir}"])
    torch.set_num_threads(1)
    device = torch.device("cpu")
    splits = make_splits(base.data, base.train.max_train_images, 0)
    size = base.model.input_size
    states = []
    for seed in args.seeds:
        cfg = load_config(Path(args.config), [*args.set, f"train.epochs={args.epochs}", "train.num_threads=1",
                                              "tracking.enabled=false", f"train.cache_dir={args.cache_dir}",
                                              f"train.seed={seed}"])
        seed_everything(seed)
        model = FastFlow(cfg.model)
        encoded = encode_splits(model, cfg, splits, device)
        optimizer, scheduler, steps = make_optimizer(model, cfg, len(splits.train))
        ema = make_ema(model, ema_decay(args.ema_halflife, steps))
        states.append(dict(seed=seed, cfg=cfg, model=model, encoded=encoded, optimizer=optimizer,
                           scheduler=scheduler, ema=ema, generator=torch.Generator().manual_seed(seed)))
    out = open(args.out, "a")
    for epoch in range(1, args.epochs + 1):
        for s in states:
            start = time.perf_counter()
            cfg, model = s["cfg"], s["model"]
            loss, _ = train_epoch(model, _train_batches(model, cfg, splits, s["encoded"], device, s["generator"]),
                                  s["optimizer"], s["scheduler"], cfg, device, epoch,
                                  after_step=lambda s=s: s["ema"].update_parameters(s["model"]))
            train_s = time.perf_counter() - start
            pixel = epoch % args.pixel_every == 0 or epoch == args.epochs or epoch <= 1
            for weights, net in (("raw", model), ("ema", s["ema"].module)):
                test_out = flow_outputs(net, s["encoded"].test, cfg.eval.batch_size)
                val_out = flow_outputs(net, s["encoded"].validation, cfg.eval.batch_size)
                for row in evaluate_variants(test_out, val_out, s["encoded"].test, s["encoded"].validation, size,
                                             args.topk, cfg.eval.aupro_fpr_limit, pixel):
                    out.write(json.dumps({"seed": s["seed"], "epoch": epoch, "weights": weights, "train_loss": loss,
                                          **row}) + "\n")
            out.flush()
            print(f"seed {s['seed']} epoch {epoch}: train {train_s:.0f} s, total {time.perf_counter() - start:.0f} s",
                  flush=True)


# ------------------------------------------------------------------ summary


def score_norm_rows(rows: list[dict]) -> list[dict]:
    """`model.score_norm=position` with `map_norm=none` (norm `none/pos`): the image score of the position-standardised
    map, the pixel metrics of the raw map; both were measured on the same outputs."""
    raw = {(r["seed"], r["epoch"], r["weights"], r["map"], r["score"]): r for r in rows if r["norm"] == "none"}
    derived = []
    for r in rows:
        if r["norm"] == "position" and r["score"] in MAP_SCORES:
            plain = raw[(r["seed"], r["epoch"], r["weights"], r["map"], r["score"])]
            derived.append({**plain, "norm": "none/pos", "image_auroc": r["image_auroc"],
                            "val_image_auroc": r["val_image_auroc"],
                            "border_max_fraction": r["border_max_fraction"]})
    return derived


def summarise(path: Path, last_epoch: int | None = None) -> str:
    """Per variant, mean ± sd over seeds under three epoch-selection rules, and the largest drop from the peak."""
    rows = [json.loads(line) for line in open(path)]
    if last_epoch:
        rows = [r for r in rows if r["epoch"] <= last_epoch]
    rows += score_norm_rows(rows)
    by = defaultdict(lambda: defaultdict(dict))  # variant -> seed -> epoch -> row
    for r in rows:
        by[(r["weights"], r["map"], r["norm"], r["score"])][r["seed"]][r["epoch"]] = r
    seeds_epochs = {v: min(len(e) for e in s.values()) for v, s in by.items()}
    fmt = lambda xs: f"{np.mean(xs):.3f}±{np.std(xs, ddof=1) if len(xs) > 1 else 0:.3f}" if xs else "-"
    lines = [f"epochs <= {min(seeds_epochs.values())}, seeds {sorted({r['seed'] for r in rows})}; "
             f"rules: last = fixed last epoch (leak-free); val = best `val_image_auroc` epoch ({LEAK_FREE.label}); "
             f"test = best test image AUROC epoch ({PAPER.label}, reference only). drop = largest fall of test "
             "image AUROC after its peak (per seed). px/aupro from the last epoch with pixel metrics at or before "
             "the chosen epoch.",
             "| weights | map | norm | score | img last | img val | img test | drop | px last | aupro last | "
             "px val | aupro val | border max |", "|" + "---|" * 13]
    for variant in sorted(by):
        per_seed = by[variant]
        n = min(len(e) for e in per_seed.values())
        cols = defaultdict(list)
        for seed, epochs in per_seed.items():
            eps = sorted(epochs)[:n]
            last = eps[-1]
            val = max(eps, key=lambda e: (epochs[e]["val_image_auroc"], e))  # ties: the later epoch
            test = max(eps, key=lambda e: epochs[e]["image_auroc"])
            curve = [epochs[e]["image_auroc"] for e in eps]
            peak = int(np.argmax(curve))
            cols["last"].append(epochs[last]["image_auroc"])
            cols["val"].append(epochs[val]["image_auroc"])
            cols["test"].append(epochs[test]["image_auroc"])
            cols["drop"].append(curve[peak] - min(curve[peak:]))
            for rule, epoch in (("last", last), ("val", val)):
                with_px = [e for e in eps if e <= epoch and "pixel_auroc" in epochs[e]]
                if with_px:
                    cols[f"px {rule}"].append(epochs[with_px[-1]]["pixel_auroc"])
                    cols[f"aupro {rule}"].append(epochs[with_px[-1]]["aupro"])
            if "border_max_fraction" in epochs[last]:
                cols["border"].append(epochs[last]["border_max_fraction"])
        lines.append("| " + " | ".join(variant) + " | " + " | ".join(
            fmt(cols[k]) for k in ("last", "val", "test", "drop", "px last", "aupro last", "px val", "aupro val",
                                   "border")) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/efficientnet_lite0.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--ema-halflife", type=float, default=2.0, help="EMA half-life in epochs")
    parser.add_argument("--topk", type=float, default=0.01)
    parser.add_argument("--pixel-every", type=int, default=1, help="pixel AUROC/AUPRO every N epochs")
    parser.add_argument("--cache-dir", default=".cache/features")
    parser.add_argument("--out", default="levers.jsonl")
    parser.add_argument("--summarise", type=Path)
    parser.add_argument("--last-epoch", type=int)
    args = parser.parse_args()
    if args.summarise:
        print(summarise(args.summarise, args.last_epoch))
    else:
        run(args)


if __name__ == "__main__":
    main()
