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
