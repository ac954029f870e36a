"""Built-in offline "synthetic" category in the MVTec AD folder layout.

Normal images are a woven (basket-weave) fabric texture with random phase, orientation,
thread pitch, brightness, tint, low-frequency shading and grain. Defects are local
anomalies with an exact binary mask. Everything is deterministic in ``SyntheticSpec.seed``.

The category's test defects are smaller and fainter than ``make_defect``'s defaults
(``SyntheticSpec.defect_scale``, ``defect_contrast``): a model must see a thin, half-blended
scratch on the weave, so the demo sweep ranks configurations instead of scoring all of them 1.0.
``make_defect``'s defaults (clear defects) stay what the leak-free validation set paints.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

SYNTHETIC_CATEGORY = "synthetic"
DEFECT_TYPES = ("scratch", "spot", "hole")
SPEC_FILE = "synthetic_spec.json"
GENERATOR_VERSION = 2  # bump when the pictures change, so stored categories regenerate
_LO, _HI = 40, 215  # normal pixels stay in [_LO, _HI]; defect pixels leave it -> always changed


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 0
    image_size: int = 128
    n_train: int = 60
    n_validation: int = 10
    n_test_good: int = 12
    n_test_per_defect: int = 8
    defect_scale: float = 0.5  # size of the test defects relative to make_defect's default
    defect_contrast: float = 0.3  # blend weight of a painted test defect over the surface (1 = opaque)


def sample_rng(seed: int, folder: str, index: int) -> np.random.Generator:
    """Independent, process-stable generator for image ``index`` of ``folder`` (e.g. "test/spot")."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(folder.encode()), index]))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return noise / (np.abs(noise).max() + 1e-8)  # in [-1, 1]


def make_texture(rng: np.random.Generator, height: int, width: int | None = None) -> np.ndarray:
    """A normal (defect-free) woven-fabric image, HxWx3 uint8 with values in [_LO, _HI]."""
    width = width or height
    side = min(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    theta = np.deg2rad(rng.uniform(-8.0, 8.0))
    pitch = side / rng.uniform(9.0, 12.0)  # thread-cell size in pixels
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / pitch + rng.uniform(0, 1)
    v = (-xx * np.sin(theta) + yy * np.cos(theta)) / pitch + rng.uniform(0, 1)
    over = (np.floor(u) + np.floor(v)) % 2 == 0  # which thread lies on top in this cell
    fibre = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * np.where(over, u, v))  # fine fibre ridges
    weave = np.where(over, np.sin(np.pi * (v % 1)), np.sin(np.pi * (u % 1))) * (0.8 + 0.2 * fibre)
    shading = _smooth_noise(rng, (height, width), side / 8)
    grain = rng.standard_normal((height, width))
    gray = 75 + 105 * weave + 20 * shading + 6 * grain + rng.uniform(-15, 15)
    tint = np.array([1.0, 0.9, 0.74]) + rng.uniform(-0.05, 0.05, 3)
    return np.clip(np.rint(gray[..., None] * tint), _LO, _HI).astype(np.uint8)


def _blob(rng: np.random.Generator, shape: tuple[int, int], radius: float) -> np.ndarray:
    """Irregular filled region (rotated ellipse with a noisy outline) fully inside the image."""
    h, w = shape
    radius = min(max(radius, 2.0), min(h, w) / 2)
    cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ang, ratio = rng.uniform(0, np.pi), rng.uniform(0.55, 1.0)
    a = ((xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)) / radius
    b = (-(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)) / (radius * ratio)
    region = np.hypot(a, b) + 0.35 * _smooth_noise(rng, shape, radius / 3) < 1.0
    region[min(int(cy), h - 1), min(int(cx), w - 1)] = True  # never empty
    return region


def _scratch(img: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    side = min(h, w)
    p0, p2 = rng.uniform(0.1, 0.9, 2) * (w, h), rng.uniform(0.1, 0.9, 2) * (w, h)
    while np.hypot(*(p2 - p0)) < 0.3 * side:  # long enough to be a scratch
        p2 = rng.uniform(0.1, 0.9, 2) * (w, h)
    p2 = p0 + (p2 - p0) * scale  # a shorter scratch on the same chord: still inside the image
    normal = np.array([p0[1] - p2[1], p2[0] - p0[0]])  # perpendicular to the chord, same length
    p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.4, 0.4)  # quadratic Bezier: gentle bow
    t = np.linspace(0, 1, 40)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2
    canvas = Image.new("L", (w, h), 0)
    width = max(1, int(round(side / 64 * rng.uniform(1.0, 1.6) * scale)))
    ImageDraw.Draw(canvas).line([tuple(p) for p in pts], fill=255, width=width)
    mask = np.asarray(canvas) > 0
    bright = img[mask].mean() < 128  # contrast with the surface
    value = rng.integers(232, 256, mask.sum()) if bright else rng.integers(0, 25, mask.sum())
    out = img.copy()
    out[mask] = value[:, None]
    return out, mask


def _spot(img: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    mask = _blob(rng, (h, w), min(h, w) * rng.uniform(0.07, 0.12) * scale)
    dark = img[mask].mean() >= 128
    colour = np.array([25, 90, 150]) if dark else np.array([230, 120, 60])  # blue-ish / rust
    colour = colour + rng.integers(-20, 21, 3)
    pix = 0.45 * img[mask] + 0.55 * colour + 12 * rng.standard_normal((int(mask.sum()), 1))
    pix[:, 0] = np.clip(pix[:, 0], 0, 30) if dark else np.clip(pix[:, 0], 225, 255)  # leave range
    out = img.copy()
    out[mask] = np.rint(pix).astype(np.uint8)
    return out, mask


def _hole(img: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    inner = _blob(rng, (h, w), min(h, w) * rng.uniform(0.07, 0.13) * scale)
    rim = ndimage.binary_dilation(inner, iterations=max(1, min(h, w) // 64)) & ~inner
    out = img.astype(np.int16)
    bright_inside = img[inner].mean() < 70  # on a dark surface the gap shows a bright backing
    base = 240 if bright_inside else 12
    out[inner] = base + rng.integers(-10, 11, (int(inner.sum()), 1))
    ys, xs = np.nonzero(rim)
    cy, cx = np.argwhere(inner).mean(axis=0)
    lit = (ys - cy) + (xs - cx) < 0  # torn edge: lit upper-left, shadowed lower-right
    out[ys[lit], xs[lit]] = np.minimum(out[ys[lit], xs[lit]] + 70, 255)
    out[ys[~lit], xs[~lit]] = out[ys[~lit], xs[~lit]] // 3
    mask = inner | rim
    return np.clip(out, 0, 255).astype(np.uint8), mask


_DEFECTS = {"scratch": _scratch, "spot": _spot, "hole": _hole}


def _blend(image: np.ndarray, painted: np.ndarray, contrast: float) -> np.ndarray:
    """`image` moved `contrast` of the way to `painted`; every pixel that `painted` changed moves by >= 1."""
    delta = painted.astype(np.int16) - image.astype(np.int16)
    step = np.rint(contrast * delta).astype(np.int16)
    step = np.where((step == 0) & (delta != 0), np.sign(delta), step)
    return (image.astype(np.int16) + step).astype(np.uint8)


def make_defect(image: np.ndarray, kind: str, rng: np.random.Generator, scale: float = 1.0,
                contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Paint a ``kind`` defect onto an HxWx3 uint8 image; return (new image, bool HxW mask).

    ``scale`` shrinks the defect, ``contrast`` in (0, 1] blends it with the surface (1: opaque).
    The mask is the painted region; on images from ``make_texture`` every masked pixel differs.
    """
    if kind not in _DEFECTS:
        raise ValueError(f"unknown defect {kind!r}; expected one of {DEFECT_TYPES}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8 image, got {image.shape} {image.dtype}")
    if not (0 < scale <= 1 and 0 < contrast <= 1):
        raise ValueError(f"expected 0 < scale <= 1 and 0 < contrast <= 1, got scale={scale}, contrast={contrast}")
    painted, mask = _DEFECTS[kind](image, rng, scale)
    return (painted, mask) if contrast == 1 else (_blend(image, painted, contrast), mask)


def render(spec: SyntheticSpec, folder: str, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Image ``index`` of ``folder`` ("train/good", "test/hole", ...) and its mask (None if good)."""
    rng = sample_rng(spec.seed, folder, index)
    image = make_texture(rng, spec.image_size)
    kind = folder.split("/")[1]
    if kind == "good":
        return image, None
    return make_defect(image, kind, rng, spec.defect_scale, spec.defect_contrast)


def folders(spec: SyntheticSpec) -> list[tuple[str, int]]:
    good = [("train/good", spec.n_train), ("validation/good", spec.n_validation), ("test/good", spec.n_test_good)]
    return good + [(f"test/{kind}", spec.n_test_per_defect) for kind in DEFECT_TYPES]


def _spec_record(spec: SyntheticSpec) -> dict:
    return {**asdict(spec), "generator_version": GENERATOR_VERSION}


def _stored_record(cat_dir: Path) -> dict | None:
    try:
        return json.loads((cat_dir / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(cat_dir: Path) -> None:
    """Only an earlier synthetic category (or an empty folder) may be replaced."""
    try:
        ours = cat_dir.is_dir() and ((cat_dir / SPEC_FILE).exists() or not any(cat_dir.iterdir()))
    except FileNotFoundError:
        return  # renamed away by a concurrent process while we looked: nothing is left there to protect
    if cat_dir.exists() and not ours:
        raise FileExistsError(f"{cat_dir} exists and is not a synthetic category; not overwriting")


def _remove_previous(cat_dir: Path) -> None:
    _check_replaceable(cat_dir)
    trash = cat_dir.with_name(f".{cat_dir.name}.old-{uuid.uuid4().hex}")
    try:
        os.rename(cat_dir, trash)  # atomic: never a half-deleted category that looks complete
    except FileNotFoundError:
        return  # absent, or a concurrent process moved it first
    shutil.rmtree(trash, ignore_errors=True)


def generate_category(root: Path, spec: SyntheticSpec = SyntheticSpec(), category: str = SYNTHETIC_CATEGORY) -> Path:
    """Write <root>/<category>/{train,validation,test}/..., ground_truth masks, spec JSON last."""
    cat_dir = Path(root) / category
    _remove_previous(cat_dir)
    for folder, count in folders(spec):
        (cat_dir / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = render(spec, folder, i)
            Image.fromarray(image, "RGB").save(cat_dir / folder / f"{i:03d}.png")
            if mask is not None:
                gt_dir = cat_dir / "ground_truth" / folder.split("/")[1]
                gt_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255, "L").save(gt_dir / f"{i:03d}_mask.png")
    tmp = cat_dir / f".{SPEC_FILE}.tmp"
    tmp.write_text(json.dumps(_spec_record(spec), indent=2, sort_keys=True))
    os.replace(tmp, cat_dir / SPEC_FILE)
    return cat_dir


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock where available (POSIX); the atomic renames are the real guarantee."""
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def ensure_category(root: Path, spec: SyntheticSpec = SyntheticSpec(), category: str = SYNTHETIC_CATEGORY) -> Path:
    """Generate <root>/<category> unless it already holds this exact spec; safe to call concurrently.

    Builds in a hidden sibling folder and renames it into place, so <category> is either absent or
    complete (with its spec JSON); an interrupted run leaves at most a hidden ``.<category>.tmp-*``.
    """
    root = Path(root)
    target, want = root / category, _spec_record(spec)
    if _stored_record(target) == want:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{category}.lock"):
        for _ in range(3):
            if _stored_record(target) == want:
                return target
            _check_replaceable(target)
            staging = root / f".{category}.tmp-{uuid.uuid4().hex}"
            try:
                built = generate_category(staging, spec, category)
                if _stored_record(target) != want:
                    _remove_previous(target)
                with suppress(OSError):  # fails if a concurrent process got there first: re-check
                    os.rename(built, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    if _stored_record(target) != want:
        raise RuntimeError(f"could not create synthetic category at {target}")
    return target
