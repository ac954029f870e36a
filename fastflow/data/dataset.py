"""MVTec AD-layout data: pure listing functions that check the layout, and a Dataset that only loads.

Layout: `<root>/<category>/train/good/*`, optional `validation/good/*`, `test/<good|defect>/*`,
`ground_truth/<defect>/<stem>_mask.png`. Images of any size and mode become RGB in [0, 1] at the
input size (the model applies the backbone's normalization); masks are resized with nearest neighbour.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fastflow.data.anomalies import AnomalySpec, validation_anomaly
from fastflow.data.synthetic import SYNTHETIC_CATEGORY, SyntheticSpec, ensure_category
from fastflow.runtime.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Sample:
    image: Path
    label: int  # 0 good, 1 defective
    mask: Optional[Path]  # None: all-good mask
    defect: str


@dataclass(frozen=True)
class Splits:
    train: list[Sample]
    validation: list[Sample]  # held-out normal images; may be empty
    test: list[Sample]
    validation_source: str = ""  # where the held-out normals come from (tagged on the run)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def category_dir(root: Path, category: str) -> Path:
    """`<root>/<category>`, with an error listing the categories found when it is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root} (data.root; set MVTEC_ROOT or run `fastflow download mvtec`)")
    folder = root / category
    if not (folder / "train").is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        raise FileNotFoundError(f"category '{category}' not found under {root} (data.category); "
                                f"categories found: {', '.join(found) or 'none'}")
    return folder


def list_good(folder: Path, what: str) -> list[Sample]:
    images = _images_in(folder) if folder.is_dir() else []
    if not images:
        raise FileNotFoundError(f"no images in {folder} ({what} needs normal images)")
    return [Sample(path, 0, None, "good") for path in images]


def list_test(folder: Path) -> list[Sample]:
    """Sorted test rows; every defective image must have `ground_truth/<defect>/<stem>_mask.png` and vice versa."""
    test_dir, truth_dir = folder / "test", folder / "ground_truth"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"missing test folder: {test_dir}")
    samples = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        images = _images_in(defect_dir)
        if defect == "good":
            samples += [Sample(path, 0, None, defect) for path in images]
            continue
        masks = {p.name: p for p in _images_in(truth_dir / defect)} if (truth_dir / defect).is_dir() else {}
        for path in images:
            mask = masks.pop(f"{path.stem}_mask.png", None)
            if mask is None:
                raise FileNotFoundError(f"image without mask: {path} (expected {truth_dir / defect / (path.stem + '_mask.png')})")
            samples.append(Sample(path, 1, mask, defect))
        if masks:
            raise FileNotFoundError(f"mask without image: {next(iter(masks.values()))}")
    if not samples:
        raise FileNotFoundError(f"no test images under {test_dir}")
    return samples


def resolve_root(cfg: DataConfig) -> Path:
    """The data root, generating the built-in synthetic category there on first use."""
    root = Path(cfg.root)
    if cfg.category == SYNTHETIC_CATEGORY:
        ensure_category(root, SyntheticSpec(seed=cfg.synthetic_seed))
    return root


def make_splits(cfg: DataConfig, max_train_images: int = 0, seed: int = 0) -> Splits:
    folder = category_dir(resolve_root(cfg), cfg.category)
    train = list_good(folder / "train" / "good", "training")
    validation: list[Sample] = []
    source = "none (data.val_fraction=0)"
    if (folder / "validation" / "good").is_dir():
        validation = list_good(folder / "validation" / "good", "validation")
        source = f"validation/good ({len(validation)} images)"
    elif cfg.val_fraction > 0:
        n_val = held_out_count(len(train), cfg.val_fraction, cfg.val_min_images)
        shuffled = random.Random(seed).sample(train, len(train))
        validation, train = sorted(shuffled[:n_val], key=_key), sorted(shuffled[n_val:], key=_key)
        source = (f"held out {n_val} of {len(train) + n_val} train/good images (data.val_fraction={cfg.val_fraction:g}, "
                  f"data.val_min_images={cfg.val_min_images}, seed {seed})" if n_val else
                  f"none (train/good has {len(train)} images, too few to hold any out)")
        if not n_val:
            log.warning("%s: %d training images, too few to hold out normals; selection falls back to the test set",
                        folder, len(train))
    if max_train_images:
        train = sorted(random.Random(seed).sample(train, min(max_train_images, len(train))), key=_key)
    return Splits(train, validation, list_test(folder), source)


def anomaly_spec(cfg: DataConfig) -> AnomalySpec:
    """The validation anomalies `data.val_anomalies/val_severity/val_copies` ask for."""
    return AnomalySpec(tuple(cfg.val_anomalies), tuple(cfg.val_severity), copies=cfg.val_copies)


def held_out_count(n_train: int, fraction: float, minimum: int) -> int:
    """Normals to hold out of `n_train`: `fraction` of them, at least `minimum`, never more than half."""
    if fraction <= 0:
        return 0
    return min(max(minimum, math.ceil(n_train * fraction)), n_train // 2)


def _key(sample: Sample) -> str:
    return str(sample.image)


def content_hash(samples: list[Sample]) -> str:
    """sha1 over the bytes of every image and mask (order-sensitive), 12 hex chars."""
    digest = hashlib.sha1()
    for sample in samples:
        for path in (sample.image, sample.mask):
            if path is not None:
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def dataset_hash(samples: list[Sample]) -> str:
    """`content_hash` of the samples in path order: the same files give the same hash however they are split (held-out
    normals drawn per seed), so runs that differ only in `train.seed` share it (the report's configurations)."""
    return content_hash(sorted(samples, key=lambda sample: str(sample.image)))


# ---------------------------------------------------------------- loading


def load_rgb(path: Path) -> Image.Image:
    """Any mode (L, RGB, RGBA, 16-bit I;16/I) -> 8-bit RGB; errors name the file."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                scale = 65535.0 if array.max() > 255 else 255.0
                image = Image.fromarray((array / scale * 255).clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL RGB -> `(3, size, size)` float in [0, 1]."""
    resized = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def load_mask(path: Path, image_size: tuple[int, int], size: int) -> torch.Tensor:
    """Binary mask `(1, size, size)`; a mask whose size differs from its image is resized with a warning."""
    try:
        with Image.open(path) as mask:
            mask = mask.convert("L")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read mask {path}: {error}") from None
    if mask.size != image_size:
        log.warning("mask %s is %sx%s but its image is %sx%s; resizing it", path, *mask.size, *image_size)
    resized = mask.resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(resized) > 127).unsqueeze(0).float()


def mean_level(samples: list[Sample], size: int) -> float:
    """The mean grey level in [0, 1] of the images at the input size (the reference of `model.exposure: mean`)."""
    if not samples:
        raise ValueError("the mean level of no images is undefined")
    return float(np.mean([image_tensor(load_rgb(s.image), size).mean().item() for s in samples]))


def source_of(row: int, n_normals: int) -> int:
    """The normal image row `row` of an `ImageDataset` with anomalies derives from: the normals come first, then
    `copies` anomalous copies of each, in the same order."""
    return row % n_normals


class ImageDataset(Dataset):
    """Rows -> `(image (3,S,S) in [0,1], mask (1,S,S), label)`.

    With `anomalies`, the rows are followed by `anomalies.copies` anomalous copies of each (label 1, the
    generated mask; another row's image is the donor texture) — the leak-free validation set built from
    held-out normal images. Deterministic in `seed`.
    """

    def __init__(self, samples: list[Sample], size: int, anomalies: Optional[AnomalySpec] = None, seed: int = 0):
        self.samples = samples
        self.size = size
        self.anomalies = anomalies
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples) * (1 + (self.anomalies.copies if self.anomalies else 0))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        sample = self.samples[source_of(index, len(self.samples))]
        image = load_rgb(sample.image)
        if index >= len(self.samples):
            return self._with_anomaly(image, index - len(self.samples))
        if sample.mask is None:
            mask = torch.zeros(1, self.size, self.size)
        else:
            mask = load_mask(sample.mask, image.size, self.size)
        return image_tensor(image, self.size), mask, sample.label

    def _resized(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.resize((self.size, self.size), Image.BILINEAR))

    def _with_anomaly(self, image: Image.Image, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        n = len(self.samples)
        donor = None
        if n > 1:  # another held-out image, a different one for each copy
            donor = self._resized(load_rgb(self.samples[(index % n + 1 + (index // n) % (n - 1)) % n].image))
        defective, mask = validation_anomaly(self._resized(image), donor, self.anomalies, self.seed, index, n)
        tensor = torch.from_numpy(defective.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return tensor, torch.from_numpy(mask).unsqueeze(0).float(), 1
