"""Names checked before any work: a category MLflow can store works end to end (a real `tire.v2` folder); one it
cannot, or one that leaves `data.root`, stops in one line before a model is built or a run exists; a sweep in
which no trial completed exits non-zero saying why."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from fastflow import cli
from fastflow.tracking.registry import CHAMPION

from conftest import DEMO_YAML, TINY_RUN, write_space

TIRE_FILES = {"train/good": 6, "validation/good": 4, "test/good": 3, "test/cut": 3}


@pytest.fixture
def tire_v2(tmp_path: Path, tire_root: Path) -> Path:
    """A real category folder `<tmp>/data/tire.v2`: a few of the tire sample's images, linked (read-only data)."""
    folder = tmp_path / "data" / "tire.v2"
    for sub, count in TIRE_FILES.items():
        (folder / sub).mkdir(parents=True)
        for source in sorted((tire_root / "tire" / sub).iterdir())[:count]:
            (folder / sub / source.name).symlink_to(source)
    (folder / "ground_truth" / "cut").mkdir(parents=True)
    for source in sorted((tire_root / "tire" / "test" / "cut").iterdir())[:3]:
        mask = tire_root / "tire" / "ground_truth" / "cut" / f"{source.stem}_mask.png"
        (folder / "ground_truth" / "cut" / mask.name).symlink_to(mask)
    return folder.parent


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_category_with_a_dot_trains_sweeps_and_registers(stores, tire_v2: Path, capsys):
    """Failed before the fix: `data.category=tire.v2` trained for the whole run, then exited 1 with MLflow's
    `Invalid model name ('tire.v2-...')` traceback; the sweep failed every trial that way and exited 0."""
    tmp = stores["tmp"]
    settings = [*TINY_RUN, "model.input_size=64", f"train.cache_dir={tmp / 'cache'}", f"data.root={tire_v2}",
                "data.category=tire.v2", "data.val_copies=2", "eval.heatmap_images=2"]
    assert cli.main(["train", "--config", str(DEMO_YAML), *(f"--set={s}" for s in settings)]) == 0, \
        capsys.readouterr().err
    [run] = _runs(os.environ["MLFLOW_TRACKING_URI"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["model_name"] == f"tire-v2-{run.info.run_name}"  # MLflow's logged-model names hold no '.'

    assert cli.main(["sweep", "--space", str(write_space(tmp, epochs=1)), "--category", "tire.v2", "--root",
                     str(tire_v2), "--trials", "1"]) == 0, capsys.readouterr().err
    assert "registered fastflow-tire.v2 version 1" in capsys.readouterr().out
    champion = MlflowClient().get_model_version_by_alias("fastflow-tire.v2", CHAMPION)
    assert MlflowClient().get_run(champion.run_id).data.tags["category"] == "tire.v2"
    # the versions table shows the description's first line as it is: plain text, no markdown
    assert champion.description.splitlines()[0] == "tire.v2 model from run trial-000 (study fastflow-tire.v2-tiny, trial 0)"


@pytest.mark.parametrize("category, rule", [
    ("../outside/tirex", "one folder directly inside data.root"),
    ("tire:v2", "cannot contain '/' or ':'"),
])
def test_a_name_mlflow_or_the_data_root_refuses_stops_before_any_work(stores, tmp_path: Path, category: str,
                                                                        rule: str, capsys):
    """Failed before the fix: `../outside/tirex` trained on a folder outside data.root; `tire:v2` trained, and its
    model could then never be registered."""
    outside = tmp_path / "outside" / "tirex"
    (tmp_path / "data").mkdir()
    outside.mkdir(parents=True)
    (tmp_path / "data" / "tire:v2").mkdir()
    for command in (["train", "--config", str(DEMO_YAML), "--set", f"data.root={tmp_path / 'data'}", "--set",
                     f"data.category={category}"],
                    ["sweep", "--space", str(write_space(tmp_path)), "--category", category, "--root",
                     str(tmp_path / "data"), "--trials", "1"]):
        assert cli.main(command) == 2
        printed = capsys.readouterr()
        lines = printed.err.strip().splitlines()
        assert len(lines) == 1 and f"data.category={category!r}" in lines[0] and rule in lines[0], printed
    assert _runs(os.environ["MLFLOW_TRACKING_URI"]) == []  # no run, not even a parent run
    assert not Path(stores["storage"].removeprefix("sqlite:///")).exists()  # no study either


def test_a_sweep_with_no_complete_trial_exits_1_saying_why(stores, tiny_mvtec: Path, capsys):
    """Failed before the fix: every trial failed and the sweep exited 0 after "no trial completed"."""
    space = write_space(stores["tmp"])  # a category without validation/good and nothing held out: leak-free fails
    space.write_text(space.read_text().replace("fixed:\n", "fixed:\n  data.val_fraction: 0\n"))
    code = cli.main(["sweep", "--space", str(space), "--category", tiny_mvtec.name, "--root", str(tiny_mvtec.parent),
                     "--trials", "1"])
    printed = capsys.readouterr()
    assert code == 1, printed.err
    last = printed.err.strip().splitlines()[-1]
    assert last.startswith(f"error: no trial of study fastflow-{tiny_mvtec.name}-tiny completed (1 failed); trial #0: ")
    assert "needs held-out normals" in last and "nothing was registered" in last
    study = optuna.load_study(study_name=f"fastflow-{tiny_mvtec.name}-tiny", storage=stores["storage"])
    assert [t.state.name for t in study.trials] == ["FAIL"]
