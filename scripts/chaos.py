"""`make chaos`: kill `fastflow train` / `fastflow sweep` (1 and 2 workers) / racing `fastflow promote` with
SIGINT, SIGTERM or SIGKILL at a random point, re-run once, and check the invariants of fastflow.invariants
through the MLflow and Optuna APIs. Store faults besides: a tracking-server outage (`mlflow server` stopped
for 60 s after a training's first epoch, then started again), a full disk (the store on a tmpfs with a random
few MB free, then grown and the training run again), a damaged store (a copy of the MLflow store or the Optuna
storage truncated, overwritten, garbled in places, emptied or replaced by another SQLite file, then opened by a
random command) and racing first sweeps (2-3 sweeps started together on stores that do not exist yet). Everything lives in a temp folder; the stores' URIs carry a
password that must never appear in the stores (any table), an artifact or a log.

    python scripts/chaos.py [--minutes 15] [--seed 0] [--keep]

Prints one line per kill or fault and a table of those tried per kind and violations found; exit 1 on any
violation. Every kind is tried at least once, however short `--minutes`.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
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
sys.path.insert(0, str(REPO / "scripts"))
from fault_env import MlflowServer, run_on_small_disk, small_disk_available  # noqa: E402

SECRET = "chaos-s3cret"
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
TARGETS = ("train", "sweep-1-worker", "sweep-2-workers", "promote-race")
FAULTS = ("server-outage", "disk-full", "damaged-store", "racing-first-sweeps")  # store faults and first-run races
DAMAGES = ("truncated", "random bytes", "garbled pages", "0 bytes", "foreign sqlite")
OUTAGE_SECONDS = 60
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
        self.server: MlflowServer | None = None
        self.disk_rounds = 0

    def train_command(self, uri: str, epochs: int = 3) -> list[str]:
        sets = [f"data.root={self.data}", f"train.cache_dir={self.folder / 'cache'}", "model.input_size=64",
                f"train.epochs={epochs}", "train.max_train_images=16", "eval.heatmap_images=2", "train.num_threads=1",
                f"tracking.uri={uri}"]
        return [sys.executable, "-m", "fastflow.cli", "train", "--config", str(REPO / "experiments" / "demo.yaml")] + \
            [item for s in sets for item in ("--set", s)]

    def command(self, target: str) -> list[str]:
        cli = [sys.executable, "-m", "fastflow.cli"]
        if target == "train":
            return self.train_command(f"sqlite:///{self.folder / 'mlflow.db'}?password={SECRET}")
        workers = 2 if target == "sweep-2-workers" else 1
        return cli + ["sweep", "--space", str(self.space), "--category", "synthetic", "--root", str(self.data),
                      "--trials", str(workers), "--workers", str(workers), "--study", "chaos"]

    def start(self, command: list[str], name: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        self.count += 1
        log = open(self.logs / f"{self.count:03d}-{name}.log", "w")
        return subprocess.Popen(command, env=env or self.env, cwd=cwd or self.folder, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

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
        from fastflow.tracking.store import connect

        os.environ["MLFLOW_TRACKING_URI"] = self.env["MLFLOW_TRACKING_URI"]
        client = connect(reap=False)
        experiment = client.get_experiment_by_name("fastflow")
        runs = [r.info.run_id for r in client.search_runs(
            [experiment.experiment_id], "attributes.status = 'FINISHED' and tags.category = 'synthetic'")
            if "model_uri" in r.data.tags] if experiment else []
        if not runs:
            return "no finished run yet"
        script = ("import sys; from fastflow.tracking.registry import promote; "
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
        from fastflow.tracking.invariants import check_all
        from fastflow.tracking.store import connect

        os.environ["MLFLOW_TRACKING_URI"] = self.env["MLFLOW_TRACKING_URI"]
        connect(reap=False)
        return check_all(self.env["OPTUNA_STORAGE"], [SECRET], [self.folder / "artifacts", self.logs],
                         [self.folder / "mlflow.db", self.folder / "optuna.db"])

    @staticmethod
    def check_store(database: Path, folders: list[Path]) -> list[str]:
        """The invariants of an MLflow store of its own (no Optuna), read from its sqlite file."""
        from fastflow.tracking.invariants import check_all
        from fastflow.tracking.store import connect

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{database}"
        connect(reap=False)
        return check_all(None, [SECRET], folders, [database])

    @staticmethod
    def one_line_problems(code: int, text: str, fault: str) -> list[str]:
        """A failed command must say so in one `error:` line naming the fault, without a traceback."""
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        if code == 0:
            return []
        if len(errors) != 1 or "Traceback" in text or fault not in errors[0]:
            return [f"exit {code} without one '{fault}' error line ({len(errors)} error lines, "
                    f"{text.count('Traceback')} tracebacks)"]
        return []

    @staticmethod
    def epochs_problems(client, run, epochs: int | None) -> list[str]:
        """Every epoch logged (a finished run), or what was logged in order from epoch 1 (a failed one)."""
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        expected = list(range(1, (epochs or len(steps)) + 1))
        return [] if steps == expected else [f"run {run.info.run_id} ({run.info.status}) logged train/loss at "
                                             f"steps {steps}, expected {expected}"]

    def server_outage(self) -> tuple[str, list[str]]:
        """`fastflow train` against `mlflow server`; the server stops after the first logged epoch and starts again
        OUTAGE_SECONDS later. Held: exit 0 with every epoch on the server, or one error line and no RUNNING run."""
        from mlflow.tracking import MlflowClient

        if self.server is None:
            self.server = MlflowServer(self.folder / "server")
            self.server.start()
        epochs = 4
        process = self.start(self.train_command(f"http://chaos:{SECRET}@127.0.0.1:{self.server.port}", epochs),
                             "server-outage")
        client = MlflowClient(self.server.uri)
        run, deadline = None, time.time() + 600
        while run is None and time.time() < deadline and process.poll() is None:
            time.sleep(1)
            found = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                     if r.info.status == "RUNNING" and "train/loss" in r.data.metrics]
            run = found[0] if found else None
        if run is None:
            return f"no epoch logged (exit {process.poll()})", ["training never logged an epoch"]
        self.server.stop()
        time.sleep(OUTAGE_SECONDS)
        self.server.start()
        code = self.wait_group(process)
        text = (self.logs / f"{self.count:03d}-server-outage.log").read_text()
        problems = self.one_line_problems(code, text, "MLflow tracking store")
        if code != 0:  # the next command on this host closes a run the failure left RUNNING
            self.wait_group(self.start(self.train_command(self.server.uri, 1), "server-outage-rerun"))
        run = client.get_run(run.info.run_id)
        if code == 0 and run.info.status != "FINISHED":
            problems.append(f"train exited 0 but its run is {run.info.status}")
        problems += self.epochs_problems(client, run, epochs if code == 0 else None)
        problems += self.check_store(self.server.folder / "server.db", [self.server.folder / "artifacts", self.logs])
        return f"server stopped {OUTAGE_SECONDS} s + restart after epoch 1, exit {code}, run {run.info.status}", problems

    def disk_full(self) -> tuple[str, list[str]]:
        """`fastflow train` with its store on a tmpfs with 0.3-6 MB free, then the disk grows and the same training
        runs again. Held: one error line naming the fault, nothing logged before lost, no RUNNING run after."""
        from mlflow.tracking import MlflowClient

        self.disk_rounds += 1
        store, after = self.folder / f"full-{self.disk_rounds}", self.folder / f"full-{self.disk_rounds}-after"
        store.mkdir()
        MlflowClient(f"sqlite:///{store / 'mlflow.db'}").search_experiments()  # the schema: 0.9 MB
        free_kb = self.random.randint(300, 6000)
        uri = f"sqlite:///{store / 'mlflow.db'}?password={SECRET}"
        first, second = (self.logs / f"{self.count + k:03d}-disk-full{k}.log" for k in (1, 2))
        self.count += 2
        script = (f"{shlex.join(self.train_command(uri))} > {first} 2>&1; echo $? > {first}.code\n"
                  f'mount -o remount,size=500m "$STORE"\n'
                  f"{shlex.join(self.train_command(uri))} > {second} 2>&1; echo $? > {second}.code\n")
        size = free_kb + sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) // 1024
        run_on_small_disk(store, size, script, after, env={**self.env, "TQDM_DISABLE": "1"}, timeout=1200)
        code, rerun = (int(Path(f"{log}.code").read_text()) for log in (first, second))
        problems = self.one_line_problems(code, first.read_text(), "disk full")
        if rerun != 0:
            problems.append(f"the re-run with space again exited {rerun}")
        client = MlflowClient(f"sqlite:///{after / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"])
        if runs:
            problems += self.epochs_problems(client, runs[0], 3 if code == 0 else None)
        problems += self.check_store(after / "mlflow.db", [after / "artifacts", self.logs])
        status = runs[0].info.status if runs else "none"
        return f"{free_kb} KB free, exit {code} (first run {status}), re-run exit {rerun}", problems

    def damaged_store(self) -> tuple[str, list[str]]:
        """A copy of a store, damaged on disk, opened by a command. Held: exit 0 (damage SQLite never reads), or
        exit 2 with one error line naming the store, no traceback and no secret; a store refused before use is
        left byte for byte as it was."""
        self.disk_rounds += 1
        folder = self.folder / f"damaged-{self.disk_rounds}"
        folder.mkdir()
        kind = self.random.choice(("MLflow tracking store", "Optuna storage"))
        name = "mlflow.db" if kind.startswith("MLflow") else "optuna.db"
        source = self.folder / name
        if source.is_file() and source.stat().st_size:  # the chaos store as the rounds left it
            shutil.copyfile(source, folder / name)
        else:
            self.make_store(folder, name)
        if kind.startswith("Optuna"):
            self.make_store(folder, "mlflow.db")
        damage = self.random.choice(DAMAGES)
        self.damage(folder / name, damage)
        before = (folder / name).read_bytes()
        env = {**self.env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}?password={SECRET}",
               "OPTUNA_STORAGE": f"sqlite:///{folder / 'optuna.db'}?password={SECRET}"}
        commands = {"promote": ["promote", "--category", "synthetic"], "report": ["report", "--out", str(folder)],
                    "sweep": ["sweep", "--space", str(self.space), "--root", str(self.data), "--trials", "1",
                              "--study", "damaged"]}
        command = self.random.choice(list(commands) if kind.startswith("MLflow") else ["sweep"])
        log = self.logs / f"{self.count + 1:03d}-damaged-{command}.log"
        self.count += 1
        with open(log, "w") as handle:
            code = subprocess.run([sys.executable, "-m", "fastflow.cli", *commands[command]], env=env, cwd=folder,
                                  stdout=handle, stderr=subprocess.STDOUT, timeout=900).returncode
        text = log.read_text()
        if damage == "garbled pages":  # maybe never read: success, or any failure in one line
            problems = self.one_line_problems(code, text, "error:")
        else:  # always found before use: refused in one line naming the store, left as it was
            problems = self.one_line_problems(code, text, kind) if code == 2 else [f"exit {code}, expected 2"]
            if (folder / name).read_bytes() != before:
                problems.append(f"the refused {name} was changed")
        if SECRET in text:
            problems.append("the store's password was printed")
        return f"{damage} {name}, {command} exit {code}", problems

    def make_store(self, folder: Path, name: str) -> None:
        """A real store with something in it: MLflow's schema and an experiment, or a study with trials."""
        if name == "mlflow.db":
            from mlflow.tracking import MlflowClient

            MlflowClient(f"sqlite:///{folder / name}").create_experiment("fastflow")
        else:
            import optuna

            study = optuna.create_study(storage=f"sqlite:///{folder / name}", study_name="kept")
            study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)

    def damage(self, path: Path, damage: str) -> None:
        data = path.read_bytes()
        if damage == "truncated":
            path.write_bytes(data[:int(len(data) * self.random.uniform(0.1, 0.9))])
        elif damage == "random bytes":
            path.write_bytes(self.random.randbytes(len(data)))
        elif damage == "garbled pages":  # a few KB past the header: SQLite may or may not ever read them
            start = self.random.randint(4096, max(4096, len(data) - 8192))
            path.write_bytes(data[:start] + self.random.randbytes(4096) + data[start + 4096:])
        elif damage == "0 bytes":
            path.write_bytes(b"")
        else:
            import sqlite3

            path.unlink()
            with sqlite3.connect(path) as connection:
                connection.execute("CREATE TABLE notes (text TEXT)")

    def racing_first_sweeps(self) -> tuple[str, list[str]]:
        """2-3 `fastflow sweep --trials 1` started together on an MLflow store and an Optuna storage that do not
        exist yet. Held: every sweep exits 0, each asked trial ran (COMPLETE or PRUNED), one parent run, and the
        invariants of both stores."""
        self.disk_rounds += 1
        folder = self.folder / f"race-{self.disk_rounds}"
        folder.mkdir()
        racers = self.random.randint(2, 3)
        env = {**self.env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}?password={SECRET}",
               "OPTUNA_STORAGE": f"sqlite:///{folder / 'optuna.db'}?password={SECRET}"}
        command = [sys.executable, "-m", "fastflow.cli", "sweep", "--space", str(self.space), "--root", str(self.data),
                   "--trials", "1", "--study", "race"]
        processes = [self.start(command, "race", env, folder) for _ in range(racers)]
        codes = [self.wait_group(p, 900) for p in processes]
        problems = [f"a racing sweep exited {code}" for code in codes if code != 0]
        import optuna

        trials = optuna.load_study(study_name="race", storage=f"sqlite:///{folder / 'optuna.db'}").trials
        states = sorted(t.state.name for t in trials)
        if len(trials) != racers or any(state not in ("COMPLETE", "PRUNED") for state in states):
            problems.append(f"{racers} trials asked, the study holds {states}")
        problems += self.check_stores(folder)
        return f"{racers} sweeps on fresh stores, exits {codes}, trials {states}", problems

    def check_stores(self, folder: Path) -> list[str]:
        """The invariants of the MLflow store and Optuna storage in `folder`, plus one parent run per study."""
        from fastflow.tracking.invariants import check_all
        from fastflow.tracking.store import connect

        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}?password={SECRET}"
        client = connect(reap=False)
        problems = check_all(f"sqlite:///{folder / 'optuna.db'}", [SECRET], [folder / "artifacts", self.logs],
                             [folder / "mlflow.db", folder / "optuna.db"])
        experiment = client.get_experiment_by_name("fastflow")
        parents = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags
                   and r.data.tags.get("study")] if experiment else []
        return problems + ([] if len(parents) == 1 else [f"{len(parents)} parent runs for one study"])

    def round(self, target: str, name: str) -> tuple[str, list[str]]:
        if target == "server-outage":
            return self.server_outage()
        if target == "damaged-store":
            return self.damaged_store()
        if target == "racing-first-sweeps":
            return self.racing_first_sweeps()
        if target == "disk-full":
            return self.disk_full()
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


def all_kinds() -> list[tuple[str, str]]:
    """(target, signal) for every kill, (fault, '-') for every store fault (disk full only where a tmpfs mounts)."""
    faults = [fault for fault in FAULTS if fault != "disk-full" or small_disk_available()]
    return [(target, name) for target in TARGETS for name in SIGNALS] + [(fault, "-") for fault in faults]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0,
                        help="start no new round after this long (every kind is tried once anyway)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (stores, logs)")
    parser.add_argument("--only", nargs="*", default=[], metavar="TARGET:SIGNAL",
                        help="kinds to try, e.g. sweep-1-worker:SIGTERM or disk-full:- (default: all, in random order)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fastflow-chaos-"))
    from fastflow.data.synthetic import SyntheticSpec, ensure_category

    chaos = Chaos(folder, args.seed)
    ensure_category(chaos.data, SyntheticSpec(seed=0))
    known = all_kinds()
    kinds = list(known)
    chaos.random.shuffle(kinds)
    if args.only:
        kinds = [tuple(kind.split(":")) for kind in args.only]
        unknown = [k for k in kinds if k not in known]
        if unknown:
            parser.error(f"unknown kinds {unknown}; known: {', '.join(':'.join(k) for k in known)}")
    tried, violations, all_problems = Counter(), Counter(), []
    deadline = time.time() + 60 * args.minutes
    i = 0
    try:
        while time.time() < deadline or i < len(kinds):
            target, name = kinds[i % len(kinds)]
            i += 1
            started = time.time()
            where, problems = chaos.round(target, name)
            tried[(target, name)] += 1
            violations[(target, name)] += len(problems)
            all_problems += [f"{target} {name}: {p}" for p in problems]
            print(f"[{i:3d}] {name:<7} {target:<16} ({where}) {time.time() - started:5.0f} s, violations "
                  f"{len(problems)}" + "".join(f"\n      {p}" for p in problems), flush=True)
    finally:
        if chaos.server is not None:
            chaos.server.stop()
    print(f"\n{'kind':<26} {'tried':>5} {'violations':>10}")
    for target, name in known:
        label = target if name == "-" else f"{target} {name}"
        print(f"{label:<26} {tried[(target, name)]:>5} {violations[(target, name)]:>10}")
    print(f"{'total':<26} {sum(tried.values()):>5} {sum(violations.values()):>10}")
    if args.keep:
        print(f"stores and logs kept in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if all_problems else 0


if __name__ == "__main__":
    sys.exit(main())
