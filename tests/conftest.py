"""Shared fixtures: a tiny MVTec-style category, the real tire sample, fast run configs, tiny-run settings, a tiny
sweep space and tracking stores in tmp folders.

Everything a test writes (data, feature cache, MLflow store) lives under pytest's tmp_path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# One intra-op thread (override: FASTFLOW_TEST_THREADS=2). On a shared 2-core machine, torch's default of one
# thread per core spins against other jobs: a flow training step measured 3.4 s with 2 threads, 0.29 s with 1.
THREADS = int(os.environ.get("FASTFLOW_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))  # subprocesses (CLI, sweep workers)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fastflow.data.synthetic import SyntheticSpec, ensure_category  # noqa: E402
from fastflow.runtime.config import RunConfig, load_config  # noqa: E402

torch.set_num_threads(THREADS)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # fault_env: a stoppable tracking server, a small or read-only disk
DEMO_YAML = REPO / "experiments" / "demo.yaml"
TIRE_ROOT = REPO.parent / "shared" / "data" / "mvtec3d_tire"

TINY_RUN = ("train.epochs=1", "train.batch_size=8", "model.flow_steps=2", "train.max_train_images=8")  # seconds

TINY_CATEGORY = "widget"
TINY_SIZE = 64
TINY_DEFECT = "crack"


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random RGB picture, HxWx3 uint8."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi, 3)
    image = np.stack([128 + 60 * np.sin(2 * np.pi * (xx + yy) * 3 + p) for p in phase], axis=-1)
    return np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)


def write_tiny_category(root: Path, category: str = TINY_CATEGORY, n_train: int = 4, n_test_good: int = 2,
                        n_defect: int = 2, size: int = TINY_SIZE) -> Path:
    """`<root>/<category>/{train/good, test/good, test/crack, ground_truth/crack}` of 64-px PNGs."""
    rng = np.random.default_rng(0)
    folder = Path(root) / category
    for sub in ("train/good", "test/good", f"test/{TINY_DEFECT}", f"ground_truth/{TINY_DEFECT}"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(_texture(rng, size)).save(folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        Image.fromarray(_texture(rng, size)).save(folder / "test" / "good" / f"{i:03d}.png")
    for i in range(n_defect):
        image = _texture(rng, size)
        mask = np.zeros((size, size), np.uint8)
        top, left = 8 + 8 * i, 10 + 4 * i
        mask[top:top + 12, left:left + 12] = 255
        image[mask > 0] = (250, 20, 20)
        Image.fromarray(image).save(folder / "test" / TINY_DEFECT / f"{i:03d}.png")
        Image.fromarray(mask, "L").save(folder / "ground_truth" / TINY_DEFECT / f"{i:03d}_mask.png")
    return folder


@contextlib.contextmanager
def restored_tracking_uri() -> Iterator[None]:
    """Undo `mlflow.set_tracking_uri` after the block (fastflow.tracking calls it; it also exports
    $MLFLOW_TRACKING_URI), so one test's tmp store never becomes the next test's default."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules and os.environ.get("MLFLOW_TRACKING_URI") != before:
        sys.modules["mlflow"].set_tracking_uri(before)


@contextlib.contextmanager
def tracking_store(folder: Path) -> Iterator[str]:
    """Inside the block, MLflow uses the store `mlflow_store(folder)` through $MLFLOW_TRACKING_URI, as users set
    it; after it, the URI from before. Yields the store's URI."""
    with restored_tracking_uri(), pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_store(folder))
        sys.modules["mlflow"].set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        yield os.environ["MLFLOW_TRACKING_URI"]


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    with restored_tracking_uri():
        yield


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[dict]:
    """MLflow and Optuna stores in tmp_path, through the same environment variables users set."""
    with tracking_store(tmp_path), pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPTUNA_STORAGE", f"sqlite:///{tmp_path / 'optuna.db'}")
        yield {"tmp": tmp_path, "storage": os.environ["OPTUNA_STORAGE"]}


@pytest.fixture(autouse=True)
def _restore_sys_path():
    """Undo `mlflow.pyfunc.load_model`'s prepending of a logged model's `code/` folder to sys.path: sweep workers are
    spawned with the parent's sys.path and would import that copy of `fastflow`, outside the git checkout (their
    runs then lost their commit in the source tags)."""
    before = list(sys.path)
    yield
    sys.path[:] = before


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    """The category folder `<tmp>/data/widget` (root = `.parent`, category = `.name`).

    4 train/good, 2 test/good, 2 test/crack images (64x64 RGB PNG) with `crack` masks.
    """
    return write_tiny_category(tmp_path / "data")


@pytest.fixture
def tire_root() -> Path:
    """The real MVTec 3D-AD tire RGB sample (read-only); category 'tire'."""
    if not (TIRE_ROOT / "tire" / "train" / "good").is_dir():
        pytest.skip(f"tire sample not found at {TIRE_ROOT}")
    return TIRE_ROOT


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the built-in synthetic category, generated once per session (~1 s)."""
    root = tmp_path_factory.mktemp("synthetic-data")
    ensure_category(root, SyntheticSpec(seed=0))
    return root


_EMPTY_STORE: list[Path] = []


def mlflow_store(folder: Path) -> str:
    """`sqlite:///<folder>/mlflow.db`, started (when absent) as a copy of an empty store whose tables MLflow has
    created: the state MLflow's first use leaves, without its ~4 s of schema migrations for every test."""
    path = folder / "mlflow.db"
    if not path.exists():
        if not _EMPTY_STORE:
            from mlflow.tracking import MlflowClient

            empty = Path(tempfile.mkdtemp(prefix="mlflow-empty-store-")) / "mlflow.db"
            MlflowClient(f"sqlite:///{empty}").search_experiments()
            _EMPTY_STORE.append(empty)
        shutil.copyfile(_EMPTY_STORE[0], path)
    return f"sqlite:///{path}"


def fast_config(tmp_path: Path, *overrides: str, data_root: Path | None = None,
                preset: Path | None = DEMO_YAML) -> RunConfig:
    """A RunConfig for runs of seconds: demo preset at 64 px, 2 epochs, 16 train images, 2 heatmaps.

    Tracking goes to `sqlite:///<tmp_path>/mlflow.db` and the feature cache to `<tmp_path>/cache`;
    `overrides` (`section.key=value`) are applied last.
    """
    own_store = not any(o.startswith("tracking.uri=") for o in overrides)
    base = [
        f"train.cache_dir={tmp_path / 'cache'}",
        *([f"tracking.uri={mlflow_store(tmp_path)}"] if own_store else []),
        "tracking.experiment=tests",
        "model.input_size=64",
        "train.epochs=2",
        "train.max_train_images=16",
        "eval.heatmap_images=2",
        "data.val_copies=2",  # the default (6) costs time and changes nothing these tests check
    ]
    if data_root is not None:
        base.append(f"data.root={data_root}")
    return load_config(preset, [*base, *overrides])


@pytest.fixture
def make_config(tmp_path: Path, synthetic_root: Path) -> Callable[..., RunConfig]:
    """`make_config(*overrides)`: `fast_config` on the session's synthetic category."""

    def make(*overrides: str, preset: Path | None = DEMO_YAML) -> RunConfig:
        return fast_config(tmp_path, *overrides, data_root=synthetic_root, preset=preset)

    return make


TINY_SPACE = """
category: synthetic
trials: 4
preset: {type: categorical, choices: [efficientnet_lite0]}
presets_dir: %(presets)s
params:
  model.flow_steps: {type: int, low: 2, high: 4, step: 2}
  train.lr: {type: float, low: 5.0e-4, high: 2.0e-3, log: true}
  model.anomaly_map: {type: categorical, choices: [z2, nll]}
fixed:
  model.input_size: 64
  train.epochs: %(epochs)s
  train.batch_size: 8
  train.max_train_images: 16
  train.cache_dir: %(cache)s
  eval.heatmap_images: 2
  eval.eval_every: 1
pruner: median
"""


def write_space(tmp_path: Path, epochs: int = 2, name: str = "tiny.yaml") -> Path:
    """A sweep space of tiny trials (64 px, 16 train images) in `tmp_path`."""
    path = tmp_path / name
    path.write_text(TINY_SPACE % {"presets": REPO / "experiments", "epochs": epochs, "cache": tmp_path / "cache"})
    return path
