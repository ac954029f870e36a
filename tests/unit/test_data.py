"""Tests for fastflow.data: MVTec layout listing and its errors, loading of any image mode/size."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow.data.anomalies import ANOMALY_TYPES, AnomalySpec
from fastflow.data.dataset import (ImageDataset, Sample, category_dir, content_hash, held_out_count, list_test,
                                   load_rgb, make_splits)
from fastflow.runtime.config import DataConfig

from conftest import TINY_CATEGORY, TINY_DEFECT, TINY_SIZE


def _cfg(folder: Path, **kwargs) -> DataConfig:
    """Listing tests see every train/good image unless they ask for a hold-out (the default holds 10 % out)."""
    return DataConfig(root=str(folder.parent), category=folder.name, **{"val_fraction": 0.0, **kwargs})


def test_listing_is_sorted_labelled_and_paired(tiny_mvtec: Path) -> None:
    splits = make_splits(_cfg(tiny_mvtec))
    assert [s.image.name for s in splits.train] == ["000.png", "001.png", "002.png", "003.png"]
    assert all(s.label == 0 and s.mask is None and s.defect == "good" for s in splits.train)
    assert splits.validation == []
    # test rows: defect folders in sorted order ('crack' < 'good'), images sorted inside each
    assert [(s.defect, s.image.name) for s in splits.test] == [
        (TINY_DEFECT, "000.png"), (TINY_DEFECT, "001.png"), ("good", "000.png"), ("good", "001.png")]
    for sample in splits.test:
        if sample.defect == "good":
            assert sample.label == 0 and sample.mask is None
        else:
            assert sample.label == 1
            assert sample.mask == tiny_mvtec / "ground_truth" / sample.defect / f"{sample.image.stem}_mask.png"
    # the listing does not depend on the order the file system returns
    assert make_splits(_cfg(tiny_mvtec)) == splits


def test_non_image_files_are_ignored(tiny_mvtec: Path) -> None:
    (tiny_mvtec / "train" / "good" / "notes.txt").write_text("not an image")
    (tiny_mvtec / "train" / "good" / "Thumbs.db").write_bytes(b"\0")
    assert len(make_splits(_cfg(tiny_mvtec)).train) == 4


def test_missing_category_lists_categories_found(tiny_mvtec: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        category_dir(tiny_mvtec.parent, "bottle")
    message = str(info.value)
    assert "'bottle'" in message and TINY_CATEGORY in message and "data.category" in message


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="data root not found") as info:
        make_splits(DataConfig(root=str(missing), category="bottle"))
    assert str(missing) in str(info.value)


def test_empty_train_folder_is_named(tiny_mvtec: Path) -> None:
    train = tiny_mvtec / "train" / "good"
    for path in train.iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError) as info:
        make_splits(_cfg(tiny_mvtec))
    assert str(train) in str(info.value)


def test_image_without_mask_names_the_image(tiny_mvtec: Path) -> None:
    (tiny_mvtec / "ground_truth" / TINY_DEFECT / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="image without mask") as info:
        list_test(tiny_mvtec)
    assert str(tiny_mvtec / "test" / TINY_DEFECT / "001.png") in str(info.value)
    assert "001_mask.png" in str(info.value)  # and says which mask it expected


def test_mask_without_image_names_the_mask(tiny_mvtec: Path) -> None:
    (tiny_mvtec / "test" / TINY_DEFECT / "000.png").unlink()
    with pytest.raises(FileNotFoundError, match="mask without image") as info:
        list_test(tiny_mvtec)
    assert str(tiny_mvtec / "ground_truth" / TINY_DEFECT / "000_mask.png") in str(info.value)


def test_truncated_png_names_the_file(tiny_mvtec: Path) -> None:
    path = tiny_mvtec / "train" / "good" / "002.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        load_rgb(path)
    assert str(path) in str(info.value)
    dataset = ImageDataset(make_splits(_cfg(tiny_mvtec)).train, TINY_SIZE)
    with pytest.raises(ValueError, match="002.png"):
        dataset[2]


def test_non_image_named_png_names_the_file(tiny_mvtec: Path) -> None:
    path = tiny_mvtec / "train" / "good" / "004.png"
    path.write_text("this is not a PNG\n")
    samples = make_splits(_cfg(tiny_mvtec)).train
    assert samples[-1].image == path  # listed by suffix ...
    with pytest.raises(ValueError) as info:  # ... and refused, by name, when loaded
        ImageDataset(samples, TINY_SIZE)[4]
    assert str(path) in str(info.value)


def _odd_images(folder: Path) -> dict[str, Path]:
    """The same picture as L, RGBA, 16-bit (full and 8-bit range) and a non-square RGB."""
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (48, 48), dtype=np.uint8)
    paths = {name: folder / f"{name}.png" for name in ("L", "RGBA", "I16", "I16_low", "wide")}
    Image.fromarray(gray, "L").save(paths["L"])
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 128)])
    Image.fromarray(rgba, "RGBA").save(paths["RGBA"])
    Image.fromarray(gray.astype(np.uint16) * 257).save(paths["I16"])  # 0..65535
    Image.fromarray(gray.astype(np.uint16)).save(paths["I16_low"])  # 16-bit file, 8-bit values
    Image.fromarray(rng.integers(0, 256, (40, 96, 3), dtype=np.uint8), "RGB").save(paths["wide"])
    return paths


@pytest.mark.parametrize("size", [32, TINY_SIZE])
def test_any_mode_and_shape_loads_as_rgb(tmp_path: Path, size: int) -> None:
    paths = _odd_images(tmp_path)
    assert Image.open(paths["I16"]).mode.startswith("I")  # really a 16-bit file
    samples = [Sample(path, 0, None, "good") for path in paths.values()]
    dataset = ImageDataset(samples, size)
    loaded = {name: dataset[i] for i, name in enumerate(paths)}
    for name, (image, mask, label) in loaded.items():
        assert image.shape == (3, size, size) and image.dtype == torch.float32, name
        assert 0.0 <= image.min() and image.max() <= 1.0, name
        assert mask.shape == (1, size, size) and mask.sum() == 0 and label == 0, name
    gray = loaded["L"][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # RGBA drops alpha; 16-bit images are scaled to the same 8-bit picture (either value range)
    assert torch.allclose(loaded["RGBA"][0], gray)
    assert torch.allclose(loaded["I16"][0], gray, atol=1.5 / 255)
    assert torch.allclose(loaded["I16_low"][0], gray, atol=1.5 / 255)


def test_wrong_size_mask_is_resized_with_a_warning(tiny_mvtec: Path, caplog: pytest.LogCaptureFixture) -> None:
    mask_path = tiny_mvtec / "ground_truth" / TINY_DEFECT / "000_mask.png"
    full = np.asarray(Image.open(mask_path))
    Image.fromarray(full[::2, ::2], "L").save(mask_path)  # 32x32 for a 64x64 image
    samples = make_splits(_cfg(tiny_mvtec)).test
    with caplog.at_level(logging.WARNING, logger="fastflow.data.dataset"):
        image, mask, label = ImageDataset(samples, TINY_SIZE)[0]
    assert any("000_mask.png" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert mask.shape == (1, TINY_SIZE, TINY_SIZE) and label == 1
    assert torch.equal(mask[0], torch.from_numpy(full > 127).float())  # nearest-neighbour, still binary


def test_right_size_mask_loads_silently(tiny_mvtec: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = make_splits(_cfg(tiny_mvtec)).test
    with caplog.at_level(logging.WARNING, logger="fastflow.data.dataset"):
        _, mask, _ = ImageDataset(samples, 32)[1]
    assert not caplog.records
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.mean() == pytest.approx(12 * 12 / 64**2)  # the 12x12 square, at half resolution


def test_validation_folder_is_used(tiny_mvtec: Path) -> None:
    validation = tiny_mvtec / "validation" / "good"
    validation.mkdir(parents=True)
    for name in ("000.png", "001.png"):
        shutil.copy(tiny_mvtec / "test" / "good" / name, validation / name)
    splits = make_splits(_cfg(tiny_mvtec, val_fraction=0.5))  # the folder wins over the fraction
    assert [s.image for s in splits.validation] == [validation / "000.png", validation / "001.png"]
    assert len(splits.train) == 4
    assert splits.validation_source == "validation/good (2 images)"


def test_validation_from_val_fraction(tiny_mvtec: Path) -> None:
    all_train = make_splits(_cfg(tiny_mvtec, val_fraction=0.0)).train
    assert len(all_train) == 4
    splits = make_splits(_cfg(tiny_mvtec, val_fraction=0.5), seed=3)
    assert len(splits.validation) == 2 and len(splits.train) == 2
    assert set(splits.train).isdisjoint(splits.validation)
    assert sorted(splits.train + splits.validation, key=lambda s: str(s.image)) == all_train
    assert splits.train == sorted(splits.train, key=lambda s: str(s.image))
    assert make_splits(_cfg(tiny_mvtec, val_fraction=0.5), seed=3) == splits  # deterministic in the seed
    assert "held out 2 of 4 train/good images" in splits.validation_source and "seed 3" in splits.validation_source
    # a small fraction still holds out one image
    assert len(make_splits(_cfg(tiny_mvtec, val_fraction=0.01, val_min_images=1)).validation) == 1


def test_normals_are_held_out_by_default(tiny_mvtec: Path) -> None:
    """No validation/good: 10 % of train/good, at least data.val_min_images, at most half, is held out."""
    for i in range(4, 40):  # 40 training images
        shutil.copy(tiny_mvtec / "train" / "good" / "000.png", tiny_mvtec / "train" / "good" / f"{i:03d}.png")
    splits = make_splits(DataConfig(root=str(tiny_mvtec.parent), category=tiny_mvtec.name))  # the defaults
    assert len(splits.validation) == 10 and len(splits.train) == 30  # the minimum count wins over 10 %
    assert set(splits.train).isdisjoint(splits.validation)
    assert splits.validation_source.startswith("held out 10 of 40 train/good images (data.val_fraction=0.1")
    assert held_out_count(210, 0.1, 10) == 21 and held_out_count(12, 0.1, 10) == 6 and held_out_count(1, 0.1, 10) == 0
    assert held_out_count(210, 0.0, 10) == 0
    none = make_splits(_cfg(tiny_mvtec, val_fraction=0.0))
    assert none.validation == [] and len(none.train) == 40 and none.validation_source.startswith("none")


def test_max_train_images_subsamples(tiny_mvtec: Path) -> None:
    splits = make_splits(_cfg(tiny_mvtec), max_train_images=3, seed=0)
    assert len(splits.train) == 3 and splits.train == sorted(splits.train, key=lambda s: str(s.image))
    assert len(make_splits(_cfg(tiny_mvtec), max_train_images=100).train) == 4
    assert len(splits.test) == 4  # the test set is never subsampled


def test_content_hash_follows_bytes(tiny_mvtec: Path) -> None:
    samples = make_splits(_cfg(tiny_mvtec)).test
    before = content_hash(samples)
    assert before == content_hash(samples) and len(before) == 12
    mask = samples[0].mask
    data = bytearray(mask.read_bytes())
    data[-20] ^= 0x01  # one bit of one mask
    mask.write_bytes(bytes(data))
    assert content_hash(samples) != before
    assert content_hash(samples[::-1]) != content_hash(samples)  # order-sensitive


def test_synthetic_defect_validation_rows(tiny_mvtec: Path) -> None:
    samples = make_splits(_cfg(tiny_mvtec, val_fraction=0.0)).train
    plain = ImageDataset(samples, TINY_SIZE)
    spec = AnomalySpec(copies=2)
    dataset = ImageDataset(samples, TINY_SIZE, spec, seed=0)
    n = len(samples)
    assert len(dataset) == 3 * n
    for i in range(n):
        image, mask, label = dataset[i]
        assert label == 0 and mask.sum() == 0
        assert torch.equal(image, plain[i][0])
    for i in range(n, 3 * n):
        image, mask, label = dataset[i]
        assert label == 1
        assert image.shape == (3, TINY_SIZE, TINY_SIZE) and mask.shape == (1, TINY_SIZE, TINY_SIZE)
        assert 0 < mask.sum() < TINY_SIZE**2
        assert 0.0 <= image.min() and image.max() <= 1.0
        changed = (image - plain[i % n][0]).abs().amax(dim=0) > 0
        assert changed[mask[0] > 0].float().mean() > 0.5  # the defect is painted where the mask says
        assert not changed[mask[0] == 0].any()  # and nowhere else
    # every type appears once over the 2 x 4 anomalous copies (cycled), reproducible in the seed
    assert len(ANOMALY_TYPES) <= 2 * n
    assert torch.equal(dataset[n][0], ImageDataset(samples, TINY_SIZE, spec, seed=0)[n][0])
    assert not torch.equal(dataset[n][0], ImageDataset(samples, TINY_SIZE, spec, seed=1)[n][0])


def test_dataset_hash_is_the_same_data_under_every_seed_split(tiny_mvtec: Path) -> None:
    """Without validation/good the held-out normals are drawn per seed; runs that differ only in their seed must
    still name the same data (the report averages them as one configuration; the concatenation's hash did not)."""
    from fastflow.data.dataset import content_hash, dataset_hash, make_splits

    data = DataConfig(root=str(tiny_mvtec.parent), category=tiny_mvtec.name, val_fraction=0.5, val_min_images=1)
    first, second = make_splits(data, seed=0), make_splits(data, seed=3)
    assert {s.image for s in first.train} != {s.image for s in second.train}  # another split of the same files
    everything = lambda splits: splits.train + splits.validation + splits.test
    assert content_hash(everything(first)) != content_hash(everything(second))
    assert dataset_hash(everything(first)) == dataset_hash(everything(second))
    assert dataset_hash(first.test) != dataset_hash(everything(first))
