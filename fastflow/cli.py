"""`fastflow` command line: each subcommand parses, builds a config and calls one library function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fastflow.engine.protocol import LEAK_FREE, OBJECTIVES, PAPER
from fastflow.runtime import signals
from fastflow.runtime.config import ConfigError, load_config
from fastflow.runtime.faults import store_error
from fastflow.runtime.redact import redact


def _train(args) -> int:
    signals.install()  # from the start: a SIGTERM during the slow imports is reported like a later one
    cfg = load_config(args.config, args.set)  # report config errors before the slow imports
    from fastflow.runtime.preflight import missing_gpu

    if missing_gpu(cfg.train.device):
        raise ConfigError(missing_gpu(cfg.train.device))
    from fastflow.engine.train import train_and_evaluate
    from fastflow.runtime.device import resolve_device
    from fastflow.tracking.runs import start_run

    resolve_device(cfg.train.device)  # torch's word on the device, before any run exists

    if not cfg.tracking.enabled:
        result = train_and_evaluate(cfg)
    else:
        with start_run(cfg) as tracker:
            result = train_and_evaluate(cfg, tracker)
            print(f"mlflow run: {tracker.run_id}")
    best = {k.split("/")[-1]: round(v, 4) for k, v in result.best_metrics.items() if k.startswith("eval/")}
    print(f"best epoch {result.best_epoch}, selected on {result.selection_protocol}: {best}")
    if result.reference:
        from fastflow.pages.reference import reference_line, reference_values

        print(reference_line(reference_values(result.reference), cfg.data.category))
    print(f"stored threshold: {result.threshold_source}")
    from fastflow.engine.selection import fidelity_line

    print(fidelity_line(result.fidelity, "evaluated epochs"))
    print(f"train seconds/epoch {result.seconds_per_epoch:.1f}, inference {result.inference_images_per_s:.1f} images/s, "
          f"flow parameters {result.flow_parameters / 1e6:.2f}M, peak memory "
          + ", ".join(f"{k} {v:.0f} MB" for k, v in result.peak_memory_mb.items()))
    return 0


def _reference(args) -> int:
    signals.install()
    cfg = load_config(args.config, args.set)
    from fastflow.engine.encode import reference_of
    from fastflow.pages.reference import reference_line, reference_values

    print(reference_line(reference_values(reference_of(cfg)), cfg.data.category))
    return 0


def _sweep(args) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: Optuna logs each trial instead
    signals.install()
    from fastflow.study.space import choose_space, load_space

    path, notice = choose_space(args.space, args.category)  # before the slow imports: one line within seconds
    if notice:
        print(notice, flush=True)
    from fastflow.study.storage import SweepSettings
    from fastflow.study.summary import no_trial_completed, summary_table
    from fastflow.study.sweep import run_sweep

    space = load_space(path)
    category = args.category or space.category
    trials = space.trials if args.trials is None else args.trials
    settings = SweepSettings(path, category, args.root, trials, args.workers,
                             args.study or "", args.timeout, args.objective, promote=not args.no_promote)
    result = run_sweep(settings)
    print(summary_table(result, category, settings.metric))
    if result.promotion is not None:
        _print_promotion(result.promotion)
    if trials and result.best_trial is None:  # every trial failed or was pruned: never exit 0
        print(f"error: {no_trial_completed(result)}", file=sys.stderr)
        return 1
    return 0


def _print_promotion(promotion) -> None:
    state = "is now" if promotion.promoted else "is not"
    print(f"registered {promotion.name} version {promotion.version} (run {promotion.run_id}, "
          f"{promotion.value:.4f}); it {state} @champion"
          + (f" (previous champion v{promotion.previous_champion}: {promotion.previous_value})"
             if promotion.previous_champion else ""))
    print(f"load it with mlflow.pyfunc.load_model('models:/{promotion.name}@champion')")


def _promote(args) -> int:
    from fastflow.tracking.registry import promote

    from fastflow.engine.protocol import protocol_for_objective

    metric = protocol_for_objective(args.objective).metric
    _print_promotion(promote(args.category, metric=metric, study=args.study, force=args.force))
    return 0


def _ui(args) -> int:
    import signal

    from fastflow.tracking.ui import start_ui, stop_ui, wait_until_answers

    def stop(signum, frame):  # SIGTERM like Ctrl-C: stop the server's whole process group on the way out
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    server = start_ui(args.port, args.experiment)
    try:
        if not wait_until_answers(server):
            code = server.process.poll()
            print(f"error: the MLflow UI did not answer on port {args.port}"
                  + (f" (mlflow ui exited with {code}; is the port in use?)" if code is not None else ""),
                  file=sys.stderr)
            return 1
        print(f"MLflow UI: {server.url}", flush=True)
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_ui(server)


def _download(args) -> int:
    from fastflow.data.download import download_mvtec

    print(download_mvtec(Path(args.root)))
    return 0


def _cache_clear(args) -> int:
    from fastflow.data.features import FeatureCache

    freed = FeatureCache(Path(args.cache_dir), 0).clear()
    print(f"removed {freed / 1e6:.1f} MB from {args.cache_dir}")
    return 0


def _predict(args) -> int:
    signals.install()  # SIGTERM like Ctrl-C: the images scored so far are written and counted
    from fastflow.serve.predict import predict

    rows = predict(args.model, args.input, Path(args.out), args.threshold, args.batch_size, args.device)
    flagged = sum(row.is_anomalous for row in rows)
    print(f"{len(rows)} images scored, {flagged} anomalous (threshold {rows[0].threshold_kind} = "
          f"{rows[0].threshold:.4g}); overlays, masks and results.csv/json in {args.out}")
    for row in rows[:10]:
        print(f"  {'ANOMALOUS' if row.is_anomalous else 'normal   '} {row.normalized_score:.3f}  {row.image}")
    if len(rows) > 10:
        print(f"  ... {len(rows) - 10} more in {Path(args.out) / 'results.csv'}")
    return 0


def _report(args) -> int:
    from fastflow.study.report import write_report

    result = write_report(args.experiment, Path(args.out))
    print(f"{len(result.rows)} rows (best configuration per category, backbone and selection protocol) -> "
          + ", ".join(str(p) for p in result.files))
    print(f"logged to MLflow run {result.run_id} ('report' in experiment {args.experiment})")
    return 0


def _export(args) -> int:
    from fastflow.serve.export import export_model

    result = export_model(args.model, args.format, Path(args.out), check=not args.no_check)
    print(f"exported {result.format} to {result.path}")
    if result.batch_sizes:
        print(f"checked against PyTorch at batch sizes {list(result.batch_sizes)}: max |diff| map "
              f"{result.max_map_diff:.2e}, score {result.max_score_diff:.2e}")
    return 0


def _paper(args) -> int:
    from fastflow.study.paper_run import PaperSettings, run_paper

    categories = tuple(c for text in args.categories for c in text.replace(",", " ").split())
    result = run_paper(PaperSettings(args.backbone, args.root, categories, args.trials, tuple(args.set), args.space,
                                     Path(args.out), args.workers))
    print(f"{args.backbone}: {len(result.done)} categories run now, {len(result.skipped)} done before"
          + (f", {len(result.failed)} failed" if result.failed else ""))
    for category, error in result.failed.items():
        print(f"  failed {category}: {error}")
    if result.report is not None:
        print("report: " + ", ".join(str(p) for p in result.report.files))
    return 1 if result.failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflow", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train and evaluate one configuration (one MLflow run)")
    train.add_argument("--config", type=Path, help="YAML experiment file, e.g. experiments/resnet18.yaml")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    train.set_defaults(handler=_train)

    reference = commands.add_parser("reference", help="the kNN reference alone: nearest training patch on the same "
                                                      "backbone features, no flow (leak-free: no training, no label)")
    reference.add_argument("--config", type=Path, help="YAML experiment file, e.g. experiments/efficientnet_lite0.yaml")
    reference.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                           help="override a config value, e.g. --set data.category=screw (repeatable)")
    reference.set_defaults(handler=_reference)

    sweep = commands.add_parser("sweep", help="Optuna study over a search space; every trial is an MLflow run")
    sweep.add_argument("--space", type=Path, default=None,
                       help="search space (default: sweeps/demo.yaml without --category, else sweeps/default.yaml, "
                            "or sweeps/offline.yaml where its ImageNet weights cannot be loaded)")
    sweep.add_argument("--category", default="", help="default: the space's category (synthetic for the demo)")
    sweep.add_argument("--root", default=os.environ.get("MVTEC_ROOT", "data"), help="data root ($MVTEC_ROOT)")
    sweep.add_argument("--trials", type=int, default=None,
                       help="new trials to run (default: the space's; 0 only prepares study and parent run)")
    sweep.add_argument("--workers", type=int, default=1, help="parallel worker processes on the same study")
    sweep.add_argument("--study", default="", help="study name (default fastflow-<category>-<space>)")
    sweep.add_argument("--timeout", type=float, default=None, help="seconds per worker")
    sweep.add_argument("--objective", choices=OBJECTIVES, default=LEAK_FREE.objective,
                       help=f"val (default): {LEAK_FREE.label}; test: {PAPER.label}. Part of the study's identity")
    sweep.add_argument("--no-promote", action="store_true", help="do not register/promote the best model")
    sweep.set_defaults(handler=_sweep)

    promote = commands.add_parser("promote", help="register the best run's model; move @champion if it is better")
    promote.add_argument("--category", required=True)
    promote.add_argument("--study", default="")
    promote.add_argument("--objective", choices=OBJECTIVES, default=LEAK_FREE.objective)
    promote.add_argument("--force", action="store_true", help="move @champion even if it is not better")
    promote.set_defaults(handler=_promote)

    ui = commands.add_parser("ui", help="MLflow UI on 127.0.0.1 for the local store")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--experiment", default="fastflow")
    ui.set_defaults(handler=_ui)

    download = commands.add_parser("download", help="download a data set (needs internet)")
    download.add_argument("dataset", choices=["mvtec"])
    download.add_argument("--root", default="data", help="where to extract (becomes MVTEC_ROOT)")
    download.set_defaults(handler=_download)

    cache = commands.add_parser("cache", help="manage the backbone feature cache")
    cache.add_argument("action", choices=["clear"])
    cache.add_argument("--cache-dir", default=".cache/features")
    cache.set_defaults(handler=_cache_clear)
    predict = commands.add_parser("predict", help="score images: heatmap overlays, masks, results.csv/json")
    predict.add_argument("--model", required=True,
                         help="models:/<name>@<alias>, runs:/<run id>/model, a run id, or a checkpoint .pt")
    predict.add_argument("--input", required=True, help="an image, a folder (recursive) or a quoted glob")
    predict.add_argument("--out", default="outputs/predict", help="folder for PNGs and results.csv/json (interrupted: the images scored so far; "
                              "a re-run scores every image again)")
    predict.add_argument("--threshold", choices=["f1", "val_quantile"], default=None,
                         help="stored threshold to decide with (default: the one chosen at training)")
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    predict.set_defaults(handler=_predict)

    report = commands.add_parser("report", help="our best runs vs the paper -> reports/paper_gap.{md,html,png}")
    report.add_argument("--experiment", default="fastflow")
    report.add_argument("--out", default="reports")
    report.set_defaults(handler=_report)

    export = commands.add_parser("export", help="ONNX or TorchScript graph of backbone + flow + map + score")
    export.add_argument("--model", required=True,
                        help="models:/<name>@<alias>, runs:/<run id>/model, a run id, or a checkpoint .pt")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    export.add_argument("--out", required=True, help="output file, e.g. fastflow.onnx")
    export.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch")
    export.set_defaults(handler=_export)

    paper = commands.add_parser("paper", help="train (or sweep) one backbone over the categories, resumably; "
                                              "then the report")
    paper.add_argument("--backbone", default="resnet18", help="preset in experiments/ (resnet18, cait, ...)")
    paper.add_argument("--categories", nargs="*", default=[],
                       help="default: the MVTec AD categories under --root, else every category there")
    paper.add_argument("--trials", type=int, default=0, help="0: one run per category; N: an N-trial sweep")
    paper.add_argument("--root", default=os.environ.get("MVTEC_ROOT", "data"), help="data root ($MVTEC_ROOT)")
    paper.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override for every run, e.g. --set train.epochs=100 (repeatable)")
    paper.add_argument("--space", type=Path, default=Path("sweeps/default.yaml"), help="sweep space with --trials")
    paper.add_argument("--workers", type=int, default=1, help="sweep workers with --trials")
    paper.add_argument("--out", default="reports", help="report folder")
    paper.set_defaults(handler=_paper)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.handler(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError, LookupError) as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        code = 2
    except ArithmeticError as error:  # train.NonFiniteLossError: a diverged run, marked FAILED
        print(f"error: {redact(str(error))}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt as error:  # runs and trials were already marked KILLED/FAIL on the way out
        return _interrupted(signals.exit_code(error), getattr(error, "account", ""))
    except Exception as error:  # a store's fault outside a run (disk full, read-only, server gone): one line
        fault = store_error(error, _stores())
        if fault is None:
            raise
        print(f"error: {fault}", file=sys.stderr)
        code = 2
    if signals.received() is not None:  # a signal whose exception was dropped on the way: never exit 0 after it
        return _interrupted(signals.Interrupted(signals.received()).exit_code)
    return code


def _stores() -> dict[str, str]:
    """The stores this process used, to name the one that failed (only modules already imported are asked)."""
    stores = {}
    if "mlflow" in sys.modules:
        stores["MLflow tracking store"] = sys.modules["mlflow"].get_tracking_uri()
    if "fastflow.study.storage" in sys.modules:
        stores["Optuna storage"] = sys.modules["fastflow.study.storage"].default_storage()
    return stores


def _interrupted(code: int, account: str = "") -> int:
    """Say how the command ended; `account` (what was done and where it is) is the last line."""
    closed = "" if account else "; runs and trials were closed"
    print("interrupted" if code == 130 else f"terminated (SIGTERM){closed}", file=sys.stderr)
    if account:
        print(account, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
