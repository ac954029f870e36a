"""The command line the per-seed benchmarks share (`validation_anomalies.py`, `cross_fit.py`): one training per
seed written to `<out>/seed<N>.json`, then a summary table of every seed file in `--out`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable


def main(doc: str, default_out: str, run_seed: Callable[[argparse.Namespace, int], dict],
         summarize: Callable[[Path], str]) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/data/mvtec3d_tire")
    parser.add_argument("--category", default="tire")
    parser.add_argument("--preset", default="experiments/efficientnet_lite0.yaml")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--cache-dir", default=".cache/features")
    parser.add_argument("--out", type=Path, default=Path(default_out))
    parser.add_argument("--summarize", action="store_true", help="only print the table of what --out holds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.summarize:
        args.out.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            (args.out / f"seed{seed}.json").write_text(json.dumps(run_seed(args, seed), indent=1))
    print(summarize(args.out))


def trained_epochs(model, cfg, splits, encoded, device, seed: int):
    """Train as `fastflow.train` does, one epoch at a time; yields (epoch, mean loss) for the caller to score
    the model after each epoch."""
    import torch

    from fastflow.engine.encode import train_batches
    from fastflow.engine.optimizer import make_optimizer
    from fastflow.engine.train import train_epoch

    optimizer, scheduler, _ = make_optimizer(model, cfg, len(splits.train))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, cfg.train.epochs + 1):
        loss, _ = train_epoch(model, train_batches(model, cfg, splits, encoded, device, generator), optimizer,
                              scheduler, cfg, device, epoch)
        yield epoch, loss


def prepared(args: argparse.Namespace, seed: int):
    """The preset with the command line's data and `seed`, on one CPU thread, untracked: (config, splits, an
    untrained model, the splits' backbone features through the feature cache, device)."""
    import torch

    from fastflow.core.model import FastFlow
    from fastflow.data.dataset import make_splits
    from fastflow.engine.encode import encode_splits
    from fastflow.engine.train import seed_everything
    from fastflow.runtime.config import load_config

    cfg = load_config(Path(args.preset), [f"data.root={args.root}", f"data.category={args.category}",
                                          f"train.seed={seed}", f"train.epochs={args.epochs}", "train.num_threads=1",
                                          "tracking.enabled=false", f"train.cache_dir={args.cache_dir}"])
    seed_everything(seed)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    splits = make_splits(cfg.data, 0, seed)
    model = FastFlow(cfg.model).to(device)
    return cfg, splits, model, encode_splits(model, cfg, splits, device), device
