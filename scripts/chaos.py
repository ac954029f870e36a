"""`make chaos`: kill `fastflow train` / `fastflow sweep` (1 and 2 workers) / racing `fastflow promote` with
SIGINT, SIGTERM or SIGKILL at a random point, re-run once, and check the invariants of fastflow.invariants
through the MLflow and Optuna APIs. Everything lives in a temp folder; the stores' URIs carry a password
(`?password=...`) that must never appear in a param, tag, artifact or log.

    python scripts/chaos.py [--minutes 15] [--seed 0] [--keep]

Prints one line per kill and a table of kills tried per kind and violations found; exit 1 on any violation.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECRET = "chaos-s3cret"
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
TARGETS = ("train", "sweep-1-worker", "sweep-2-workers", "promote-race")
SPACE = """
category: synthetic
trials: 2
preset: {type: categorical, choices: [efficientnet_lite0]}
presets_dir: %(presets)s
params:
  model.flow_steps: {type: int, low: 2, high: 4, step: 2}
  train.lr: {type: float, low: 5.0e-4, high: 2.0e-3, log: true}
fixed:
  model.input_size: 64
  train.epochs: 3
  train.batch_size: 8
  train.max_train_images: 16
  train.cache_dir: %(cache)s
  eval.heatmap_images: 2
pruner: median
"""


class Chaos:
    def __init__(self, folder: Path, seed: int):
        self.folder = folder
        self.random = random.Random(seed)
        self.logs = folder / "logs"
        self.logs.mkdir()
        self.data = folder / "data"
        self.space = folder / "chaos.yaml"
        self.space.write_text(SPACE % {"presets": REPO / "experiments", "cache": folder / "cache"})
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}?password={SECRET}",
                    "OPTUNA_STORAGE": f"sqlite:///{folder / 'optuna.db'}?password={SECRET}",
                    "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                    "PYTHONPATH": str(REPO)}
        self.count = 0

    def command(self, target: str) -> list[str]:
        cli = [sys.executable, "-m", "fastflow.cli"]
        if target == "train":
            sets = [f"data.root={self.data}", f"train.cache_dir={self.folder / 'cache'}", "model.input_size=64",
                    "train.epochs=3", "train.max_train_images=16", "eval.heatmap_images=2", "train.num_threads=1",
                    f"tracking.uri=sqlite:///{self.folder / 'mlflow.db'}?password={SECRET}"]
            return cli + ["train", "--config", str(REPO / "experiments" / "demo.yaml")] + \
                [item for s in sets for item in ("--set", s)]
        workers = 2 if target == "sweep-2-workers" else 1
        return cli + ["sweep", "--space", str(self.space), "--category", "synthetic", "--root", str(self.data),
                      "--trials", str(workers), "--workers", str(workers), "--study", "chaos"]

    def start(self, command: list[str], name: str) -> subprocess.Popen:
        self.count += 1
        log = open(self.logs / f"{self.count:03d}-{name}.log", "w")
        return subprocess.Popen(command, env=self.env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    @staticmethod
    def children(pid: int) -> list[int]:
        try:
            return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    @staticmethod
    def wait_group(process: subprocess.Popen, seconds: float = 600) -> int:
        """Wait for the command, then for every process of its group (orphaned workers finish their trial)."""
        code = process.wait(timeout=seconds)
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return code
            time.sleep(1)
        os.killpg(process.pid, signal.SIGKILL)
        return code

    def kill(self, process: subprocess.Popen, name: str, target: str) -> str:
        """Send `name` at a random point: SIGINT to the group (Ctrl-C), SIGTERM/SIGKILL to one process
        (the command, or for 2 workers sometimes a worker)."""
        time.sleep(self.random.uniform(1.0, 30.0 if target.startswith("sweep") else 20.0))
        if process.poll() is not None:
            return "finished before the kill"
        if name == "SIGINT":
            os.killpg(process.pid, signal.SIGINT)
            return "group"
        victim, who = process.pid, "command"
        workers = self.children(process.pid)
        if target == "sweep-2-workers" and workers and self.random.random() < 0.5:
            victim, who = self.random.choice(workers), "worker"
        try:
            os.kill(victim, SIGNALS[name])
        except ProcessLookupError:
            return "finished before the kill"
        return who

    def promote_race(self, name: str) -> str:
        """3 promoters at once, each for another finished run (or the category's best); one gets the signal."""
        from fastflow.tracking import connect

        os.environ["MLFLOW_TRACKING_URI"] = self.env["MLFLOW_TRACKING_URI"]
        client = connect(reap=False)
        experiment = client.get_experiment_by_name("fastflow")
        runs = [r.info.run_id for r in client.search_runs(
            [experiment.experiment_id], "attributes.status = 'FINISHED' and tags.category = 'synthetic'")
            if "model_uri" in r.data.tags] if experiment else []
        if not runs:
            return "no finished run yet"
        script = ("import sys; from fastflow.registry import promote; "
                  "promote('synthetic', experiment='fastflow', run_id=sys.argv[1] if len(sys.argv) > 1 else '')")
        chosen = [self.random.choice(runs) for _ in range(2)] + [""]
        racers = [self.start([sys.executable, "-c", script] + ([r] if r else []), "promote") for r in chosen]
        victim = self.random.choice(racers)
        time.sleep(self.random.uniform(2.0, 12.0))
        try:
            (os.killpg if name == "SIGINT" else os.kill)(victim.pid, SIGNALS[name])
        except ProcessLookupError:
            pass
        for racer in racers:
            self.wait_group(racer)
        rerun = self.start([sys.executable, "-m", "fastflow.cli", "promote", "--category", "synthetic"], "rerun")
        rerun.wait()
        return "one of 3 racing promoters"

    def check(self) -> list[str]:
        from fastflow.invariants import check_all
        from fastflow.tracking import connect

        os.environ["MLFLOW_TRACKING_URI"] = self.env["MLFLOW_TRACKING_URI"]
        connect(reap=False)
        return check_all(self.env["OPTUNA_STORAGE"], [SECRET], [self.folder / "artifacts", self.logs])

    def round(self, target: str, name: str) -> tuple[str, list[str]]:
        if target == "promote-race":
            where = self.promote_race(name)
        else:
            process = self.start(self.command(target), f"{target}-{name}")
            where = self.kill(process, name, target)
            code = self.wait_group(process)
            where += f", exit {code}"
            rerun = self.start(self.command(target), f"{target}-rerun")
            where += f", re-run exit {self.wait_group(rerun)}"
        return where, self.check()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="stop starting new kills after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (stores, logs)")
    parser.add_argument("--only", nargs="*", default=[], metavar="TARGET:SIGNAL",
                        help="kinds to try, e.g. sweep-1-worker:SIGTERM (default: all, in random order)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fastflow-chaos-"))
    from fastflow.synthetic import SyntheticSpec, ensure_category

    chaos = Chaos(folder, args.seed)
    ensure_category(chaos.data, SyntheticSpec(seed=0))
    kinds = [(target, name) for target in TARGETS for name in SIGNALS]
    chaos.random.shuffle(kinds)
    if args.only:
        kinds = [tuple(kind.split(":")) for kind in args.only]
        unknown = [k for k in kinds if k[0] not in TARGETS or k[1] not in SIGNALS]
        if unknown:
            parser.error(f"unknown kinds {unknown}; targets {TARGETS}, signals {tuple(SIGNALS)}")
    tried, violations, all_problems = Counter(), Counter(), []
    deadline = time.time() + 60 * args.minutes
    i = 0
    while time.time() < deadline:
        target, name = kinds[i % len(kinds)]
        i += 1
        started = time.time()
        where, problems = chaos.round(target, name)
        tried[(target, name)] += 1
        violations[(target, name)] += len(problems)
        all_problems += [f"{target} {name}: {p}" for p in problems]
        print(f"[{i:3d}] {name:<7} {target:<16} ({where}) {time.time() - started:5.0f} s, violations {len(problems)}"
              + "".join(f"\n      {p}" for p in problems), flush=True)
    print(f"\n{'kind':<26} {'kills':>5} {'violations':>10}")
    for target in TARGETS:
        for name in SIGNALS:
            print(f"{target + ' ' + name:<26} {tried[(target, name)]:>5} {violations[(target, name)]:>10}")
    print(f"{'total':<26} {sum(tried.values()):>5} {sum(violations.values()):>10}")
    if args.keep:
        print(f"stores and logs kept in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if all_problems else 0


if __name__ == "__main__":
    sys.exit(main())
