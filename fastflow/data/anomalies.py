"""Synthetic anomalies for held-out normal images: the leak-free validation set (maths only, no I/O).

Every generator takes an HxWx3 uint8 image, a numpy Generator and a `severity` in [0, 1] (0: small and
faint, 1: large and strong) and returns `(image, mask)`, the mask a non-empty bool HxW array of the
changed region. Deterministic for a given generator state. Types (literature in ../shared/REFERENCE.md):

- `cutpaste`: a rectangle cut from this or another normal image, colour-jittered, optionally rotated,
  pasted elsewhere with an opacity (CutPaste, Li et al. 2021; NSA-style when the patch comes from another image).
- `scar`: a thin rotated stripe of shifted, jittered pixels (CutPaste-scar).
- `texture`: a Perlin-noise region filled with a texture taken from another normal image of the category,
  rotated and rescaled, blended with an opacity (DRAEM-style without an external texture set).
- `distortion`: a local intensity, colour, blur or small geometric (warp) change inside a smooth region.
- `painted`: the built-in category's scratch / spot / hole (fastflow.synthetic), blended with an opacity.
- `scratch`: a short, thin, slightly curved line lighter or darker than the part under it.
- `missing`: a bite out of the part's outline near one of its ends, where the background shows (a hole on a texture).
- `dent`: a small local deformation of the part's outline (pixels pulled towards a point on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from fastflow.data.synthetic import DEFECT_TYPES, make_defect

ANOMALY_TYPES = ("cutpaste", "scar", "texture", "distortion", "painted", "scratch", "missing", "dent")
GENERATOR_VERSION = 2  # bump when the pictures change (part of the validation feature-cache key)


@dataclass(frozen=True)
class AnomalySpec:
    """What the validation set draws: types (cycled over the anomalous copies), a severity range, copies per normal."""
    kinds: tuple[str, ...] = ANOMALY_TYPES
    severity: tuple[float, float] = (0.0, 1.0)
    copies: int = field(kw_only=True)  # no default here: runs take `data.val_copies`

    def __post_init__(self) -> None:
        check_kinds(self.kinds)
        low, high = self.severity
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"severity range {self.severity} must satisfy 0 <= low <= high <= 1")
        if self.copies < 1:
            raise ValueError(f"copies={self.copies} must be >= 1")

    def cache_tag(self) -> str:
        """Identifies the generated images (for the validation feature-cache key)."""
        return f"v{GENERATOR_VERSION}-{'+'.join(self.kinds)}-s{self.severity[0]:g}-{self.severity[1]:g}-c{self.copies}"


def check_kinds(kinds: Sequence[str], key: str = "data.val_anomalies") -> None:
    unknown = [k for k in kinds if k not in ANOMALY_TYPES]
    if unknown or not kinds:
        raise ValueError(f"{key}={list(kinds)!r}: expected one or more of {', '.join(ANOMALY_TYPES)}")


def _lerp(low: float, high: float, t: float) -> float:
    return low + (high - low) * t


def _check_image(image: np.ndarray, what: str = "image") -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected {what} as HxWx3 uint8, got {image.shape} {image.dtype}")


def _blend(image: np.ndarray, other: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`alpha`-weighted mix (alpha HxW in [0,1]) of two HxWx3 arrays -> uint8."""
    mixed = image.astype(np.float64) * (1 - alpha[..., None]) + other.astype(np.float64) * alpha[..., None]
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _colour_jitter(pixels: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Brightness, contrast and per-channel shifts of up to `amount` (fraction of the range); float array."""
    out = pixels.astype(np.float64)
    mean = out.mean()
    out = (out - mean) * (1 + rng.uniform(-amount, amount)) + mean * (1 + rng.uniform(-amount, amount))
    return out + rng.uniform(-amount, amount, 3) * 255 * 0.5


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2D Perlin noise HxW in about [-1, 1] with `cells` gradient cells per axis (DRAEM's `rand_perlin_2d`)."""
    h, w = shape
    ch, cw = cells
    angles = 2 * np.pi * rng.random((ch + 1, cw + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = yy * ch / h, xx * cw / w
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - iy, x - ix

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[iy + dy, ix + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    ty, tx = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - tx) + corner(0, 1) * tx
    bottom = corner(1, 0) * (1 - tx) + corner(1, 1) * tx
    return math.sqrt(2) * (top * (1 - ty) + bottom * ty)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of `values`: the cut that best separates two groups (max between-class variance)."""
    counts, edges = np.histogram(values, 256)
    centres = (edges[:-1] + edges[1:]) / 2
    below, mass = np.cumsum(counts), np.cumsum(counts * centres)
    between = (mass[-1] * below - mass * below[-1]) ** 2 / np.maximum(below * (below[-1] - below), 1e-9)
    return float(centres[int(np.argmax(between[:-1]))])


def _edge_pixels(values: np.ndarray, inset: int = 0) -> np.ndarray:
    """The values along the image border, `inset` pixels in (HxW or HxWxC -> (n,) or (n, C))."""
    return np.concatenate([values[inset], values[-1 - inset], values[:, inset], values[:, -1 - inset]])


def foreground(image: np.ndarray) -> np.ndarray:
    """Where defects may be centred: the part, HxW bool. Pixels whose colour differs from the background's (the
    image border's) by more than Otsu's cut, or whose surroundings are more textured than the background's; small
    specks dropped. The whole image when that finds no clear part (textures, parts that fill the frame). Real
    defects lie on the part, never on the background; a thin part (a screw) must not grow a wide margin."""
    pixels = image.astype(np.float64)
    level = np.median(_edge_pixels(pixels), axis=0)
    distance = np.linalg.norm(ndimage.gaussian_filter(pixels, (1, 1, 0)) - level, axis=-1)
    gray = pixels.mean(axis=-1)
    local_mean = ndimage.uniform_filter(gray, 7)
    texture = np.sqrt(np.maximum(ndimage.uniform_filter(gray**2, 7) - local_mean**2, 0))
    border_texture = _edge_pixels(texture, inset=3)
    part = ((distance > max(_otsu(distance), 1.5 * np.quantile(_edge_pixels(distance), 0.99)))
            | (texture > max(3 * np.median(border_texture), 1.2 * np.quantile(border_texture, 0.99))))
    side = min(image.shape[:2])
    part = ndimage.binary_fill_holes(ndimage.binary_closing(part, iterations=max(1, side // 64)))
    part = ndimage.binary_opening(part, iterations=max(1, side // 128))
    labels, count = ndimage.label(part)
    if count:
        sizes = np.bincount(labels.ravel())[1:]
        part = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max()))
    return part if 0.02 <= part.mean() <= 0.9 else np.ones(gray.shape, bool)


def _centre(rng: np.random.Generator, shape: tuple[int, int], margin: float,
            allowed: Optional[np.ndarray] = None) -> tuple[float, float]:
    """A centre at least `margin` from the border (as far as the image allows), inside `allowed` when it can be."""
    h, w = shape
    my, mx = min(margin, h / 2), min(margin, w / 2)
    if allowed is not None:
        ys, xs = np.nonzero(allowed)
        keep = (ys >= my) & (ys <= h - my) & (xs >= mx) & (xs <= w - mx)
        if keep.any():
            pick = int(rng.choice(np.flatnonzero(keep)))
            return float(ys[pick]), float(xs[pick])
    return rng.uniform(my, h - my), rng.uniform(mx, w - mx)


def perlin_region(rng: np.random.Generator, shape: tuple[int, int], radius: float,
                  allowed: Optional[np.ndarray] = None) -> np.ndarray:
    """A non-empty irregular region about `radius` pixels across: Perlin noise thresholded inside an ellipse."""
    h, w = shape
    cells = int(rng.integers(2, 7))
    noise = perlin_noise(shape, (cells, cells), rng)
    cy, cx = _centre(rng, shape, radius, allowed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle, ratio = rng.uniform(0, np.pi), rng.uniform(0.4, 1.0)
    a = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / radius
    b = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / (radius * ratio)
    inside = np.hypot(a, b) < 1.0
    inside[min(int(cy), h - 1), min(int(cx), w - 1)] = True
    level = np.quantile(noise[inside], rng.uniform(0.2, 0.6))  # keep 40-80 % of the ellipse, in noisy blobs
    region = inside & (noise >= level)
    return region if region.any() else inside


def _size(shape: tuple[int, int], severity: float, rng: np.random.Generator, low: float, high: float) -> float:
    """A length in pixels: a fraction of the shorter side between `low` and `high` by severity, jittered ±30 %."""
    return min(shape) * _lerp(low, high, severity) * rng.uniform(0.7, 1.3)


def _opacity(severity: float, rng: np.random.Generator) -> float:
    return float(np.clip(_lerp(0.35, 0.95, severity) + rng.uniform(-0.1, 0.1), 0.2, 1.0))


def cutpaste(image: np.ndarray, rng: np.random.Generator, severity: float, donor: Optional[np.ndarray] = None,
             allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    area = _size((h, w), severity, rng, 0.12, 0.32) ** 2
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    ph = int(np.clip(round(math.sqrt(area * aspect)), 2, h - 1))
    pw = int(np.clip(round(math.sqrt(area / aspect)), 2, w - 1))
    source = donor if donor is not None and rng.random() < 0.5 else image
    sy, sx = rng.integers(0, source.shape[0] - ph + 1), rng.integers(0, source.shape[1] - pw + 1)
    patch = source[sy:sy + ph, sx:sx + pw]
    if rng.random() < 0.5:
        patch = np.rot90(patch, 2)  # same shape, clearly misplaced structure
    patch = np.clip(_colour_jitter(patch, rng, _lerp(0.05, 0.3, severity)), 0, 255)
    cy, cx = _centre(rng, (h, w), max(ph, pw) / 2, allowed)
    ty, tx = int(np.clip(round(cy - ph / 2), 0, h - ph)), int(np.clip(round(cx - pw / 2), 0, w - pw))
    pasted = image.astype(np.float64)
    pasted[ty:ty + ph, tx:tx + pw] = patch
    mask = np.zeros((h, w), bool)
    mask[ty:ty + ph, tx:tx + pw] = True
    return _blend(image, pasted, mask * _opacity(severity, rng)), mask


def scar(image: np.ndarray, rng: np.random.Generator, severity: float, donor: Optional[np.ndarray] = None,
         allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    length = _size((h, w), severity, rng, 0.12, 0.35)
    width = max(1, int(round(min(h, w) * _lerp(0.008, 0.03, severity) * rng.uniform(0.7, 1.3))))
    cy, cx = _centre(rng, (h, w), length / 2, allowed)
    angle = rng.uniform(0, np.pi)
    dy, dx = 0.5 * length * math.sin(angle), 0.5 * length * math.cos(angle)
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width)
    mask = np.asarray(canvas) > 0
    mask[min(int(cy), h - 1), min(int(cx), w - 1)] = True
    shift = (int(rng.integers(h // 8, h // 2 + 1)), int(rng.integers(w // 8, w // 2 + 1)))
    source = np.roll(image, shift, axis=(0, 1))
    jittered = np.clip(_colour_jitter(source, rng, _lerp(0.15, 0.5, severity)), 0, 255)
    return _blend(image, jittered, mask * _opacity(severity, rng)), mask


def texture(image: np.ndarray, rng: np.random.Generator, severity: float, donor: Optional[np.ndarray] = None,
            allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    source = donor if donor is not None else image
    zoom = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    angle = float(rng.uniform(0, 360))
    foreign = Image.fromarray(source).rotate(angle, resample=Image.BILINEAR, expand=False)
    sh, sw = max(2, int(round(source.shape[0] / zoom))), max(2, int(round(source.shape[1] / zoom)))
    crop_y, crop_x = rng.integers(0, max(1, source.shape[0] - sh + 1)), rng.integers(0, max(1, source.shape[1] - sw + 1))
    foreign = foreign.crop((crop_x, crop_y, crop_x + min(sw, source.shape[1]), crop_y + min(sh, source.shape[0])))
    foreign = np.asarray(foreign.resize((w, h), Image.BILINEAR))
    if rng.random() < 0.5:
        foreign = foreign[:, :, rng.permutation(3)]  # channel swap: a foreign colour
    region = perlin_region(rng, (h, w), _size((h, w), severity, rng, 0.06, 0.2), allowed)
    return _blend(image, foreign, region * _opacity(severity, rng)), region


def distortion(image: np.ndarray, rng: np.random.Generator, severity: float, donor: Optional[np.ndarray] = None,
               allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    region = perlin_region(rng, (h, w), _size((h, w), severity, rng, 0.06, 0.2), allowed)
    effect = ("intensity", "colour", "blur", "warp")[int(rng.integers(4))]
    pixels = image.astype(np.float64)
    strength = _lerp(0.15, 0.6, severity)
    if effect == "intensity":
        changed = pixels * (1 + strength * rng.choice((-1.0, 1.0))) + rng.choice((-1.0, 1.0)) * 40 * strength
    elif effect == "colour":
        changed = pixels + rng.choice((-1.0, 1.0), 3) * rng.uniform(0.5, 1.0, 3) * 120 * strength
    elif effect == "blur":
        changed = ndimage.gaussian_filter(pixels, (_lerp(1.5, 5.0, severity), _lerp(1.5, 5.0, severity), 0))
    else:
        amplitude = min(h, w) * _lerp(0.01, 0.04, severity)
        dy = ndimage.gaussian_filter(rng.standard_normal((h, w)), min(h, w) / 32) * amplitude * 8
        dx = ndimage.gaussian_filter(rng.standard_normal((h, w)), min(h, w) / 32) * amplitude * 8
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        changed = np.stack([ndimage.map_coordinates(pixels[..., c], [yy + dy, xx + dx], order=1, mode="reflect")
                            for c in range(3)], axis=-1)
    alpha = region * float(np.clip(_lerp(0.6, 1.0, severity) + rng.uniform(-0.1, 0.1), 0.0, 1.0))
    return _blend(image, np.clip(changed, 0, 255), alpha), region


def painted(image: np.ndarray, rng: np.random.Generator, severity: float, donor: Optional[np.ndarray] = None,
            allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    defective, mask = make_defect(image, DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))], rng)
    return _blend(image, defective, mask * _opacity(severity, rng)), mask


def _outline(allowed: Optional[np.ndarray], rng: np.random.Generator, extremity: bool = False) -> Optional[np.ndarray]:
    """Where the part meets the background (`allowed` is the part); with `extremity`, only its points farthest from
    the part's centre (an elongated part's ends). None for a part that fills the image (a texture)."""
    if allowed is None or allowed.all():
        return None
    edge = allowed & ~ndimage.binary_erosion(allowed)
    if extremity and edge.sum() > 4:
        ys, xs = np.nonzero(allowed)
        distance = np.hypot(*(np.nonzero(edge)[i] - c for i, c in enumerate((ys.mean(), xs.mean()))))
        far = np.zeros_like(edge)
        far[np.nonzero(edge)] = distance >= np.quantile(distance, rng.uniform(0.8, 0.95))
        edge = far
    return edge if edge.any() else None


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(distance of every pixel to `centre`, the disc of `radius` around it, never empty)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    distance = np.hypot(yy - centre[0], xx - centre[1])
    inside = distance < radius
    inside[min(int(centre[0]), shape[0] - 1), min(int(centre[1]), shape[1] - 1)] = True
    return distance, inside


def scratch(image: np.ndarray, rng: np.random.Generator, severity: float, donor: Optional[np.ndarray] = None,
            allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """A short, thin, slightly curved line lighter or darker than the surface under it (a scratch on the part)."""
    h, w = image.shape[:2]
    length = _size((h, w), severity, rng, 0.04, 0.12)
    width = max(1, int(round(min(h, w) / 256 * _lerp(1.0, 2.5, severity))))
    cy, cx = _centre(rng, (h, w), length / 2, allowed)
    angle, bend = rng.uniform(0, np.pi), rng.uniform(-0.25, 0.25) * length
    t = np.linspace(-0.5, 0.5, 12)
    along, across = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    points = [(cx + length * u * along[0] + bend * (1 - 4 * u * u) * across[0],
               cy + length * u * along[1] + bend * (1 - 4 * u * u) * across[1]) for u in t]
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line(points, fill=255, width=width, joint="curve")
    mask = np.asarray(canvas) > 0
    mask[min(int(cy), h - 1), min(int(cx), w - 1)] = True
    level = image[mask].astype(np.float64).mean()
    shift = _lerp(25, 80, severity) * (1.0 if level < 128 else -1.0)  # away from saturation
    return _blend(image, np.clip(image.astype(np.float64) + shift, 0, 255), mask * _opacity(severity, rng)), mask


def missing(image: np.ndarray, rng: np.random.Generator, severity: float, donor: Optional[np.ndarray] = None,
            allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Material missing at an end of the part: an irregular bite out of its outline, where the background shows
    (the image border's level, with its noise). On a part that fills the image (a texture): a hole."""
    h, w = image.shape[:2]
    radius = _size((h, w), severity, rng, 0.03, 0.08)
    outline = _outline(allowed, rng, extremity=True)
    bite = perlin_region(rng, (h, w), radius, outline)
    region = bite & allowed if outline is not None and (bite & allowed).any() else bite
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)
    fill = np.median(border, axis=0) + rng.normal(0, border.std(axis=0).mean() / 2 + 1, (h, w, 1))
    return _blend(image, np.clip(fill, 0, 255), region.astype(np.float64)), region


def dent(image: np.ndarray, rng: np.random.Generator, severity: float, donor: Optional[np.ndarray] = None,
         allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """A small local deformation of the part's outline (a dent, a bent or crushed thread): pixels inside a disc on
    the outline are pulled towards its centre. The mask is what changed."""
    h, w = image.shape[:2]
    radius = max(3.0, _size((h, w), severity, rng, 0.03, 0.08))
    cy, cx = _centre(rng, (h, w), 0, _outline(allowed, rng))
    distance, inside = _disc((h, w), (cy, cx), radius)
    pull = np.where(inside, radius * _lerp(0.3, 0.6, severity) * (1 - distance / radius) ** 2, 0.0)
    scale = 1 + pull / np.maximum(distance, 1e-6)  # sample farther out: content moves in
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    coords = [cy + (yy - cy) * scale, cx + (xx - cx) * scale]
    pixels = image.astype(np.float64)
    warped = np.stack([ndimage.map_coordinates(pixels[..., c], coords, order=1, mode="reflect") for c in range(3)], -1)
    mask = inside & (np.abs(warped - pixels).max(axis=-1) >= 8)
    if not mask.any():  # a flat surface shows no warp: a shallow dent's shading instead
        mask, warped = inside, pixels * 0.85
    return _blend(image, warped, mask.astype(np.float64)), mask


GENERATORS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "cutpaste": cutpaste, "scar": scar, "texture": texture, "distortion": distortion, "painted": painted,
    "scratch": scratch, "missing": missing, "dent": dent}


def make_anomaly(image: np.ndarray, kind: str, rng: np.random.Generator, severity: float = 0.5,
                 donor: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """One `kind` anomaly on an HxWx3 uint8 `image` -> (new image, non-empty bool HxW mask).

    `donor` is another normal image of the category (any size), used by `cutpaste` and `texture`. Defects are
    centred on the part (`foreground`), except `painted`, which places its own.
    """
    check_kinds([kind], "kind")
    _check_image(image)
    if donor is not None:
        _check_image(donor, "donor")
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity={severity} must be in [0, 1]")
    out, mask = GENERATORS[kind](image, rng, float(severity), donor, foreground(image))
    return out, mask.astype(bool)


def anomaly_kind(spec: AnomalySpec, index: int, n_normals: int) -> str:
    """The type of anomalous copy number `index` (copy `index // n_normals` of normal `index % n_normals`): each
    normal's copies cycle through `spec.kinds`, starting at a different type for each normal, so that every normal
    meets every type (a plain `index % len(kinds)` gives each normal one type when `len(kinds)` divides
    `n_normals`)."""
    return spec.kinds[(index % n_normals + index // n_normals) % len(spec.kinds)]


def validation_anomaly(image: np.ndarray, donor: Optional[np.ndarray], spec: AnomalySpec, seed: int,
                       index: int, n_normals: int) -> tuple[np.ndarray, np.ndarray]:
    """Anomalous copy number `index` of the validation set (`anomaly_kind`), its severity drawn uniformly from
    `spec.severity`; deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    severity = rng.uniform(*spec.severity)
    return make_anomaly(image, anomaly_kind(spec, index, n_normals), rng, severity, donor)


__all__ = ["ANOMALY_TYPES", "AnomalySpec", "GENERATORS", "check_kinds", "make_anomaly", "foreground", "perlin_noise",
           "perlin_region", "validation_anomaly", "anomaly_kind"]
