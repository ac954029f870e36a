"""`fastflow` command line: each subcommand parses, builds a config and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, load_config


def _train(args) -> int:
    from .tracking import start_run
    from .train import train_and_evaluate

    cfg = load_config(args.config, args.set)
    if not cfg.tracking.enabled:
        result = train_and_evaluate(cfg)
    else:
        with start_run(cfg) as tracker:
            result = train_and_evaluate(cfg, tracker)
            print(f"mlflow run: {tracker.run_id}")
    best = {k.split("/")[-1]: round(v, 4) for k, v in result.best_metrics.items() if k.startswith("eval/")}
    print(f"best epoch {result.best_epoch}: {best}")
    print(f"train seconds/epoch {result.seconds_per_epoch:.1f}, flow parameters {result.flow_parameters / 1e6:.2f}M")
    return 0


def _download(args) -> int:
    from .download import download_mvtec

    print(download_mvtec(Path(args.root)))
    return 0


def _cache_clear(args) -> int:
    from .features import FeatureCache

    freed = FeatureCache(Path(args.cache_dir), 0).clear()
    print(f"removed {freed / 1e6:.1f} MB from {args.cache_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflow", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train and evaluate one configuration (one MLflow run)")
    train.add_argument("--config", type=Path, help="YAML experiment file, e.g. experiments/resnet18.yaml")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    train.set_defaults(handler=_train)

    download = commands.add_parser("download", help="download a data set (needs internet)")
    download.add_argument("dataset", choices=["mvtec"])
    download.add_argument("--root", default="data", help="where to extract (becomes MVTEC_ROOT)")
    download.set_defaults(handler=_download)

    cache = commands.add_parser("cache", help="manage the backbone feature cache")
    cache.add_argument("action", choices=["clear"])
    cache.add_argument("--cache-dir", default=".cache/features")
    cache.set_defaults(handler=_cache_clear)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
