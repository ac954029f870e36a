"""How aligned a category's parts are, read from its training features alone (no label, no test image).

Normal appearance is position-specific where parts are aligned (tire, a bottle seen from above): the mean feature
at a position differs from position to position, the same in every image. Where parts lie at any position and angle
(screw) or the category is a texture, every position sees everything. The share of the feature variance that
position explains tells the two apart: measured here, .20-.24 on screw and .68-.87 on tire at every stage.
`model.feature_norm: auto` uses it to choose the flows' feature norm: the paper's LayerNorm over (C,H,W), whose
affine is per position, for aligned parts; over the channels at each position, the same everywhere, otherwise.
Tensors in, numbers out (no I/O).
"""

from __future__ import annotations

import torch

from fastflow.core.knn import local_average

ALIGNED = 0.5  # position explains at least half of the variance of normal features: aligned parts


def alignment(features: list[torch.Tensor], pool: int = 1) -> float:
    """Mean over stages `[(N,C,h,w)]` of the share of each channel's variance (over images and positions) that is
    variance of its per-position mean over the images, after the model's `local_average` of `pool`."""
    shares = []
    for stage in features:
        stage = local_average(stage.float(), pool)
        standard = (stage - stage.mean(dim=(0, 2, 3), keepdim=True)) / stage.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        between = standard.mean(dim=0).var(dim=(1, 2), correction=0)  # (C,): variance of the per-position means
        shares.append(float((between / standard.var(dim=(0, 2, 3), correction=0).clamp_min(1e-12)).mean()))
    return sum(shares) / len(shares)


def feature_norm_for(features: list[torch.Tensor], pool: int = 1) -> tuple[str, float]:
    """(`chw` for aligned parts, else `channel`; the alignment it was chosen by)."""
    share = alignment(features, pool)
    return ("chw" if share >= ALIGNED else "channel"), share
