"""Synthetic validation anomalies (fastflow.anomalies): determinism, masks, placement, difficulty."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fastflow.data.anomalies import (ANOMALY_TYPES, AnomalySpec, anomaly_kind, foreground, make_anomaly, perlin_noise,
                                     validation_anomaly)
from fastflow.data.synthetic import make_texture

SIZE = 96


def _normals(count: int, seed: int = 0) -> list[np.ndarray]:
    return [make_texture(np.random.default_rng([seed, i]), SIZE) for i in range(count)]


def _object(seed: int) -> np.ndarray:
    """A bright disc (the part) on a dark, slightly noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    image = rng.normal(20, 2, (SIZE, SIZE, 3))
    disc = np.hypot(yy - SIZE / 2, xx - SIZE / 2) < SIZE / 4
    image[disc] = rng.normal(160, 20, (int(disc.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ANOMALY_TYPES)
def test_deterministic_non_empty_masks_inside_the_image(kind: str) -> None:
    image, donor = _normals(2)
    for seed in range(5):
        a, mask_a = make_anomaly(image, kind, np.random.default_rng(seed), 0.5, donor)
        b, mask_b = make_anomaly(image, kind, np.random.default_rng(seed), 0.5, donor)
        assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b)
        assert a.shape == image.shape and a.dtype == np.uint8
        assert mask_a.shape == image.shape[:2] and mask_a.dtype == bool
        assert 0 < mask_a.sum() < mask_a.size / 2
        assert np.array_equal(a[~mask_a], image[~mask_a])  # nothing changes outside the mask
        assert (np.abs(a.astype(int) - image.astype(int)).max(axis=-1)[mask_a] > 0).mean() > 0.3
    other, _ = make_anomaly(image, kind, np.random.default_rng(99), 0.5, donor)
    assert not np.array_equal(other, a)


def test_validation_anomaly_cycles_types_and_is_seeded() -> None:
    image, donor = _normals(2)
    spec = AnomalySpec(kinds=("scar", "texture"), severity=(0.3, 0.6), copies=1)
    first, mask = validation_anomaly(image, donor, spec, seed=1, index=4, n_normals=3)
    again, mask_again = validation_anomaly(image, donor, spec, seed=1, index=4, n_normals=3)
    assert np.array_equal(first, again) and np.array_equal(mask, mask_again)
    assert not np.array_equal(validation_anomaly(image, donor, spec, seed=2, index=4, n_normals=3)[0], first)
    assert spec.cache_tag() != AnomalySpec(kinds=("scar",), severity=(0.3, 0.6), copies=1).cache_tag()


@pytest.mark.parametrize("n_normals", [4, 5, 8, 29, 32])
def test_every_normal_meets_every_anomaly_type(n_normals: int) -> None:
    """With as many copies as types, each held-out normal gets each type once, also when the number of types
    divides the number of normals (before: normal i got only type i mod 8, eight times)."""
    spec = AnomalySpec(kinds=ANOMALY_TYPES, copies=len(ANOMALY_TYPES))
    for normal in range(n_normals):
        kinds = [anomaly_kind(spec, normal + copy * n_normals, n_normals) for copy in range(spec.copies)]
        assert sorted(kinds) == sorted(ANOMALY_TYPES)


def test_defects_are_centred_on_the_part() -> None:
    part = foreground(_object(0))
    assert 0.15 < part.mean() < 0.35 and part[SIZE // 2, SIZE // 2] and not part[2, 2]
    assert foreground(_normals(1)[0]).all()  # a texture: anywhere
    for seed in range(10):
        image = _object(seed)
        for kind in ("cutpaste", "scar", "texture", "distortion"):
            _, mask = make_anomaly(image, kind, np.random.default_rng(seed), 0.3)
            assert (mask & part).sum() > 0.3 * mask.sum(), kind


def _patch_scores(images: list[np.ndarray], reference: list[np.ndarray], patch: int = 8) -> np.ndarray:
    """A detector that knows nothing of the generators: max |z| of per-patch colour means and contrast."""
    def features(image: np.ndarray) -> np.ndarray:
        h = image.shape[0] // patch
        blocks = image.astype(float)[:h * patch, :h * patch].reshape(h, patch, h, patch, 3).transpose(0, 2, 1, 3, 4)
        blocks = blocks.reshape(h * h, patch * patch, 3)
        return np.concatenate([blocks.mean(axis=1), blocks.std(axis=1)], axis=1)

    normal = np.concatenate([features(i) for i in reference])
    mean, std = normal.mean(axis=0), normal.std(axis=0) + 1e-6
    return np.array([np.abs((features(i) - mean) / std).max() for i in images])


def test_severity_controls_separability() -> None:
    reference, held_out, donors = _normals(12, seed=1), _normals(16, seed=2), _normals(16, seed=3)
    normal_scores = _patch_scores(held_out, reference)
    auroc = {}
    for severity in (0.0, 1.0):
        anomalous = [make_anomaly(image, ANOMALY_TYPES[i % len(ANOMALY_TYPES)], np.random.default_rng(i), severity,
                                  donors[i])[0] for i, image in enumerate(held_out)]
        scores = _patch_scores(anomalous, reference)
        auroc[severity] = roc_auc_score([0] * len(held_out) + [1] * len(anomalous), [*normal_scores, *scores])
    assert auroc[1.0] > auroc[0.0] + 0.1, auroc
    assert auroc[0.0] < 0.95, auroc  # the faint end is not saturated


def test_perlin_noise_and_bad_input() -> None:
    noise = perlin_noise((40, 60), (3, 5), np.random.default_rng(0))
    assert noise.shape == (40, 60) and np.abs(noise).max() <= 1.5 and noise.std() > 0.05
    image = _normals(1)[0]
    with pytest.raises(ValueError, match="kind"):
        make_anomaly(image, "crack", np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity"):
        make_anomaly(image, "scar", np.random.default_rng(0), 1.5)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        make_anomaly(image[..., 0], "scar", np.random.default_rng(0))
    with pytest.raises(ValueError, match="data.val_anomalies"):
        AnomalySpec(kinds=("scar", "smudge"), copies=1)
