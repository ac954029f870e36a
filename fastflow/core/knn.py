"""kNN feature reference: PatchCore's recipe (Roth et al., CVPR 2022) without its coreset or reweighting, on the
flows' own backbone features. No training, no epoch, no test label in any choice: leak-free by construction.

A patch is the 3x3-average-pooled feature vector of the mid-level stages (stride >= 8), the coarser stages
upsampled to the finest kept one and concatenated; the memory bank is a random subset of all training patches;
a test patch scores its Euclidean distance to the nearest bank patch (scikit-learn's exact `NearestNeighbors`);
the pixel map is the patch scores upsampled and Gaussian-blurred (sigma 4 px), the image score its max.
Tensors in, tensors out (no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import NearestNeighbors


@dataclass(frozen=True)
class KnnRecipe:
    """What the reference computes; part of its cache key."""

    pool: int = 3  # patch neighbourhood (average pooling, stride 1)
    min_stride: int = 8  # stages finer than this are left out (PatchCore's mid-level features)
    bank_fraction: float = 0.25  # of all training patches
    bank_max: int = 100_000  # bound on the bank (memory and search time on large categories)
    sigma: float = 4.0  # Gaussian blur of the upsampled map, in pixels
    seed: int = 0  # which training patches form the bank

    def key(self) -> str:
        return f"pool{self.pool}-stride{self.min_stride}-frac{self.bank_fraction:g}-max{self.bank_max}-" \
               f"sigma{self.sigma:g}-seed{self.seed}"


def reference_stages(strides: list[int], min_stride: int) -> list[int]:
    """Indices of the stages the reference reads: those with stride >= `min_stride`, or all when none is."""
    kept = [i for i, stride in enumerate(strides) if stride >= min_stride]
    return kept or list(range(len(strides)))


def local_average(features: torch.Tensor, size: int) -> torch.Tensor:
    """`(N,C,h,w)` -> `(N,C,h,w)`: each position's mean over its `size`x`size` neighbours (PatchCore's local patch;
    at the border over the neighbours that exist); size 1: unchanged."""
    if size <= 1:
        return features
    return F.avg_pool2d(features, size, stride=1, padding=size // 2, count_include_pad=False)


def patch_features(features: list[torch.Tensor], stages: list[int], pool: int) -> torch.Tensor:
    """`[(N,C_i,h_i,w_i)]` -> `(N, sum C_i, h, w)`: each kept stage averaged over `pool`x`pool` neighbours
    (`local_average`), upsampled to the finest kept stage's size and concatenated."""
    pooled = [local_average(features[i].float(), pool) for i in stages]
    side = max(p.shape[-2:] for p in pooled)
    return torch.cat([p if tuple(p.shape[-2:]) == tuple(side) else
                      F.interpolate(p, size=side, mode="bilinear", align_corners=False) for p in pooled], dim=1)


def _rows(patches: torch.Tensor) -> np.ndarray:
    """`(N,D,h,w)` -> `(N*h*w, D)` float32."""
    return patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1]).numpy().astype(np.float32, copy=False)


def memory_bank(patches: torch.Tensor, recipe: KnnRecipe) -> np.ndarray:
    """A random subset `(M, D)` of the training patches `(N,D,h,w)`: `bank_fraction` of them, at most `bank_max`."""
    rows = _rows(patches)
    size = max(1, min(int(round(len(rows) * recipe.bank_fraction)), recipe.bank_max))
    chosen = np.random.default_rng(recipe.seed).choice(len(rows), size=size, replace=False)
    return rows[np.sort(chosen)]


def nearest_distances(bank: np.ndarray, patches: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    """`(N,D,h,w)` -> `(N,1,h,w)`: each patch's Euclidean distance to its nearest bank patch."""
    index = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(bank)
    rows = _rows(patches)
    distances = np.concatenate([index.kneighbors(rows[i:i + batch], return_distance=True)[0][:, 0]
                                for i in range(0, len(rows), batch)])
    n, _, h, w = patches.shape
    return torch.from_numpy(distances).float().view(n, 1, h, w)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """`(N,1,H,W)` blurred by a separable Gaussian of `sigma` pixels (reflected borders); sigma 0: unchanged."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    rows = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(rows, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def knn_maps(train: list[torch.Tensor], test: list[torch.Tensor], strides: list[int], size: tuple[int, int],
             recipe: KnnRecipe = KnnRecipe()) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of the training and test images -> (test anomaly maps `(N,1,H,W)`, image scores `(N,)`)."""
    stages = reference_stages(strides, recipe.min_stride)
    bank = memory_bank(patch_features(train, stages, recipe.pool), recipe)
    distances = nearest_distances(bank, patch_features(test, stages, recipe.pool))
    maps = gaussian_blur(F.interpolate(distances, size=size, mode="bilinear", align_corners=False), recipe.sigma)
    return maps, maps.flatten(start_dim=1).max(dim=1).values
