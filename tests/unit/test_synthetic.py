"""Tests for the built-in synthetic MVTec-style category (fastflow.synthetic)."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from fastflow.data import synthetic
from fastflow.data.synthetic import (DEFECT_TYPES, SPEC_FILE, SyntheticSpec, ensure_category, generate_category,
                                     make_defect, make_texture, sample_rng)

SMALL = SyntheticSpec(seed=3, image_size=64, n_train=4, n_validation=2, n_test_good=2, n_test_per_defect=2)


@pytest.fixture(scope="module")
def default_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_category(tmp_path_factory.mktemp("default"))


def _files(cat_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cat_dir)): p.read_bytes() for p in sorted(cat_dir.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_determinism(tmp_path: Path) -> None:
    a = _files(generate_category(tmp_path / "a", SMALL))
    b = _files(generate_category(tmp_path / "b", SMALL))
    assert a == b
    c = _files(generate_category(tmp_path / "c", SyntheticSpec(**{**SMALL.__dict__, "seed": 4})))
    assert a.keys() == c.keys()
    pngs = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c[k] for k in pngs) == len(pngs)


def test_layout_and_counts(default_category: Path) -> None:
    spec = SyntheticSpec()
    counts = {"train/good": spec.n_train, "validation/good": spec.n_validation, "test/good": spec.n_test_good}
    counts.update({f"test/{k}": spec.n_test_per_defect for k in DEFECT_TYPES})
    for folder, n in counts.items():
        names = sorted(p.name for p in (default_category / folder).iterdir())
        assert names == [f"{i:03d}.png" for i in range(n)]
        for name in names[:3]:
            with Image.open(default_category / folder / name) as im:
                assert im.mode == "RGB" and im.size == (spec.image_size, spec.image_size)
    assert sorted(p.name for p in (default_category / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)
    assert json.loads((default_category / SPEC_FILE).read_text())["seed"] == spec.seed
    assert sorted(p.name for p in default_category.iterdir()) == sorted(
        ["train", "validation", "test", "ground_truth", SPEC_FILE]
    )


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_masks_exactly_where_pixels_changed(default_category: Path, kind: str) -> None:
    spec = SyntheticSpec()
    for i in range(spec.n_test_per_defect):
        image = _load(default_category / "test" / kind / f"{i:03d}.png")
        with Image.open(default_category / "ground_truth" / kind / f"{i:03d}_mask.png") as m:
            assert m.mode == "L" and m.size == (spec.image_size, spec.image_size)
            mask = np.asarray(m)
        assert set(np.unique(mask)) == {0, 255}
        base = make_texture(sample_rng(spec.seed, f"test/{kind}", i), spec.image_size)
        changed = (image != base).any(axis=-1)
        np.testing.assert_array_equal(changed, mask == 255)


def test_good_images_have_no_masks(default_category: Path) -> None:
    assert not (default_category / "ground_truth" / "good").exists()
    masks = list((default_category / "ground_truth").rglob("*_mask.png"))
    assert len(masks) == SyntheticSpec().n_test_per_defect * len(DEFECT_TYPES)


def test_ensure_is_idempotent_and_regenerates_on_spec_change(tmp_path: Path) -> None:
    cat = ensure_category(tmp_path, SMALL)
    stamp = (cat / SPEC_FILE).stat().st_mtime_ns, (cat / "train/good/000.png").stat().st_ino
    assert ensure_category(tmp_path, SMALL) == cat
    assert ((cat / SPEC_FILE).stat().st_mtime_ns, (cat / "train/good/000.png").stat().st_ino) == stamp
    bigger = SyntheticSpec(**{**SMALL.__dict__, "n_train": 7})
    ensure_category(tmp_path, bigger)
    assert len(list((cat / "train/good").iterdir())) == 7
    assert json.loads((cat / SPEC_FILE).read_text())["n_train"] == 7
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["synthetic"]


def test_ensure_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "precious.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        ensure_category(tmp_path, SMALL)
    with pytest.raises(FileExistsError):
        generate_category(tmp_path, SMALL)
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == ["precious.txt"]
    (tmp_path / "other").write_text("a file")
    with pytest.raises(FileExistsError):
        ensure_category(tmp_path, SMALL, category="other")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_interrupted_generation_leaves_no_category(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_render = synthetic.render

    def flaky_render(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render", flaky_render)
    with pytest.raises(KeyboardInterrupt):
        ensure_category(tmp_path, SMALL)
    assert not (tmp_path / "synthetic").exists()
    monkeypatch.setattr(synthetic, "render", real_render)
    cat = ensure_category(tmp_path, SMALL)
    assert _files(cat) == _files(generate_category(tmp_path / "ref", SMALL))


def test_a_category_moved_away_while_checked_counts_as_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race two processes replacing a stale category met (lock-free path, CI): one sees the folder, the other
    renames it away before the first lists it; the first must go on (absent), not fail with FileNotFoundError."""
    gone, is_dir = tmp_path / "synthetic", Path.is_dir
    monkeypatch.setattr(Path, "is_dir", lambda self: True if self == gone else is_dir(self))  # seen, then gone
    synthetic._check_replaceable(gone)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError):  # a folder that is there and not ours is still refused
        synthetic._check_replaceable(tmp_path / "other")


def _ensure_worker(root: str, spec: SyntheticSpec, barrier: "mp.synchronize.Barrier") -> None:
    barrier.wait()
    ensure_category(Path(root), spec)


@pytest.mark.parametrize("locking", [True, False])
@pytest.mark.parametrize("stale", [False, True])
def test_concurrent_ensure(tmp_path: Path, stale: bool, locking: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not locking:  # exercise the lock-free fallback (atomic renames only); forked children inherit it
        monkeypatch.setattr(synthetic, "fcntl", None)
    if stale:
        ensure_category(tmp_path, SyntheticSpec(**{**SMALL.__dict__, "seed": 99}))
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_ensure_worker, args=(str(tmp_path), SMALL, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cat = tmp_path / "synthetic"
    assert _files(cat) == _files(generate_category(tmp_path / "ref", SMALL))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("kind", DEFECT_TYPES)
@pytest.mark.parametrize("surface", ["texture", "white", "black", "noise"])
def test_make_defect_any_size(kind: str, surface: str) -> None:
    rng = np.random.default_rng(7)
    image = {
        "texture": make_texture(rng, 100, 70),
        "white": np.full((100, 70, 3), 255, np.uint8),
        "black": np.zeros((100, 70, 3), np.uint8),
        "noise": rng.integers(0, 256, (100, 70, 3), dtype=np.uint8),
    }[surface]
    image.setflags(write=False)  # like np.asarray(PIL image): must not be modified in place
    out, mask = make_defect(image, kind, rng)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert mask.shape == (100, 70) and mask.dtype == bool and mask.any()
    changed = (out != image).any(axis=-1)
    assert not (changed & ~mask).any()
    assert changed[mask].mean() > (0.99 if surface == "texture" else 0.5)  # visible on any surface


def test_make_defect_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        make_defect(np.zeros((8, 8, 3), np.uint8), "crack", rng)
    with pytest.raises(ValueError):
        make_defect(np.zeros((8, 8), np.uint8), "spot", rng)


def _trivial_auroc(category: Path) -> float:
    """Image AUROC of a statistic with no learning: blurred max |image - mean training image|."""
    train = np.stack([_load(p) for p in sorted((category / "train/good").glob("*.png"))]).astype(float)
    mean = train.mean(axis=0)

    def score(path: Path) -> float:
        diff = np.abs(_load(path).astype(float) - mean).mean(axis=-1)
        return float(ndimage.gaussian_filter(diff, 2.0).max())

    good = [score(p) for p in sorted((category / "test/good").glob("*.png"))]
    bad = [score(p) for k in DEFECT_TYPES for p in sorted((category / "test" / k).glob("*.png"))]
    return float(roc_auc_score([0] * len(good) + [1] * len(bad), good + bad))


def test_test_defects_are_subtle_but_clear_defects_are_detectable(default_category: Path, tmp_path: Path) -> None:
    """The demo needs a category that ranks configurations: its test defects must not be found by a trivial
    statistic, while make_defect's defaults (what the leak-free validation set paints) still are."""
    clear = generate_category(tmp_path, SyntheticSpec(defect_scale=1.0, defect_contrast=1.0))
    subtle, obvious = _trivial_auroc(default_category), _trivial_auroc(clear)
    print(f"trivial-statistic AUROC: subtle test defects {subtle:.3f}, clear defects {obvious:.3f}")
    assert obvious > 0.8
    assert subtle < 0.75


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_smaller_fainter_defects(kind: str) -> None:
    image = make_texture(np.random.default_rng(5), 128)
    full, full_mask = make_defect(image, kind, np.random.default_rng(9))
    faint, faint_mask = make_defect(image, kind, np.random.default_rng(9), scale=0.5, contrast=0.3)
    assert 0 < faint_mask.sum() < full_mask.sum()
    changed = (faint != image).any(axis=-1)
    np.testing.assert_array_equal(changed, faint_mask)  # still exactly the masked pixels, each moved by >= 1
    step = np.abs(faint.astype(int) - image.astype(int)).max(axis=-1)[faint_mask].mean()
    assert step < np.abs(full.astype(int) - image.astype(int)).max(axis=-1)[full_mask].mean()
    with pytest.raises(ValueError, match="contrast"):
        make_defect(image, kind, np.random.default_rng(9), contrast=0.0)
