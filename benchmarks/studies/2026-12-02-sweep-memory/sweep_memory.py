"""Does memory stay flat over a long in-process sweep? `fastflow.sweep.run_sweep` with one worker (trials run in
this process, as `make sweep` does) on the synthetic category, every trial a tracked MLflow run with its heatmaps,
curves, checkpoint and pyfunc model. A thread samples this process's resident memory (VmRSS) every 0.25 s; each
sample is assigned to the trial running at that moment (Optuna's start/complete times).

    .venv/bin/python benchmarks/studies/2026-12-02-sweep-memory/sweep_memory.py [--trials 50] [--epochs 1] [--json out.json]

Prints per trial the peak RSS, then the growth: the least-squares slope of the per-trial peak over the trials after
the first five (the first ones load the backbone, MLflow's and Optuna's modules), the peak of the last five minus
that of trials 6-10, and the figures pyplot still holds at the end (fewer than 15 trials: nothing skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

SPACE = """
category: synthetic
preset: {type: categorical, choices: [efficientnet_lite0]}
presets_dir: %(presets)s
params:
  model.flow_steps: {type: int, low: 2, high: 4, step: 2}
  train.lr: {type: float, low: 5.0e-4, high: 2.0e-3, log: true}
  model.anomaly_map: {type: categorical, choices: [z2, nll]}
fixed:
  model.input_size: 64
  train.epochs: %(epochs)d
  train.batch_size: 8
  train.max_train_images: 16
  train.cache_dir: %(cache)s
  train.num_threads: 1
  eval.heatmap_images: 2
  data.val_copies: 2
pruner: none
"""


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stop = interval, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((datetime.now(), rss_mb()))
            time.sleep(self.interval)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import matplotlib.pyplot as plt
    import optuna

    from fastflow.data.synthetic import SyntheticSpec, ensure_category
    from fastflow.study.storage import SweepSettings
    from fastflow.study.sweep import run_sweep

    folder = Path(tempfile.mkdtemp(prefix="fastflow-sweep-memory-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    storage = f"sqlite:///{folder / 'optuna.db'}"
    ensure_category(folder / "data", SyntheticSpec(seed=0))
    space = folder / "space.yaml"
    space.write_text(SPACE % {"presets": REPO / "experiments", "epochs": args.epochs, "cache": folder / "cache"})
    sampler = Sampler()
    sampler.start()
    started = time.time()
    result = run_sweep(SweepSettings(space, "synthetic", str(folder / "data"), args.trials, storage=storage,
                                     promote=False, study_name="memory"))
    sampler.stop.set()
    sampler.join()
    trials = optuna.load_study(study_name=result.study_name, storage=storage).trials
    peaks = []
    for trial in trials:
        inside = [mb for when, mb in sampler.samples if trial.datetime_start <= when <= (trial.datetime_complete or when)]
        peaks.append(max(inside) if inside else float("nan"))
    print(f"{len(trials)} trials ({result.counts}) in {time.time() - started:.0f} s; store {folder}")
    print("trial  peak RSS MB")
    for trial, peak in zip(trials, peaks):
        print(f"{trial.number:5d}  {peak:9.1f}")
    skip = 5 if len(trials) >= 15 else 0  # the first trials load the backbone and the libraries' modules
    x, y = np.array([t.number for t in trials])[skip:], np.array(peaks)[skip:]
    slope = float(np.polyfit(x, y, 1)[0]) if len(x) > 2 else float("nan")
    early, late = float(np.nanmax(peaks[skip:skip + 5])), float(np.nanmax(peaks[-5:]))
    summary = {"trials": len(trials), "epochs": args.epochs, "slope_mb_per_trial": slope,
               "peak_first_5_counted_mb": early, "peak_last_5_mb": late, "growth_mb": late - early,
               "max_rss_mb": max(mb for _, mb in sampler.samples), "open_figures": len(plt.get_fignums()),
               "seconds": time.time() - started, "per_trial_peak_mb": peaks}
    print(f"slope over trials {skip + 1}-{len(trials)}: {slope:+.2f} MB/trial; peak of trials {skip + 1}-{skip + 5} "
          f"{early:.0f} MB, of the last 5 "
          f"{late:.0f} MB ({late - early:+.0f} MB); open pyplot figures at the end: {summary['open_figures']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
