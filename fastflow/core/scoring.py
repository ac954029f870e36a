"""Scores from flow outputs: per-scale maps, their standardisation by held-out normals, fusion, image scores.

Tensors in, tensors out (no I/O). `score(...)` is the one entry that evaluation, `predict` and export share; the
`model.*` keys below travel together as `ScoreSettings`:

- `map_norm` (the output map) and `score_norm` (the map the image score reads; `map`: the output map):
  `none` averages the raw per-scale maps; `scale` first standardises each scale's map with the
  mean/std of that scale over held-out normal images; `position` with the mean/std of each position (the std
  shrunk half-way to the scale's, as ~30 images give a noisy per-position std). Border positions, where zero
  padding acts, otherwise score high on normal images.
- `score_map`: the kind of map the image score reads (`output`: the output map's kind; `z2` or `nll`: computed from
  the same latents), so the score can read the z2 map while the output map stays the NLL map.
- `image_score`: `max`, `topk` (mean of the top `topk_fraction` of pixels) or `mean` of the fused map;
  `nll`: the image's own negative log-likelihood under each scale's flow (sum over positions, per dimension),
  averaged over scales; `nll_z`: each scale's image NLL standardised by held-out normals, then averaged, so
  that no scale dominates.

`NormalStats` hold what was measured on held-out normals; they travel in the checkpoint (`to_dict`/`from_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from fastflow.core.anomaly_map import MAP_SCORES, fuse, image_score as map_image_score, scale_maps

MAP_NORMS = ("none", "scale", "position")
NLL_SCORES = ("nll", "nll_z")
IMAGE_SCORES = MAP_SCORES + NLL_SCORES


def missing_stats(what: str) -> ValueError:
    """The error for a score setting (`what`, e.g. `model.map_norm=scale`) that needs statistics of held-out normal
    images where there are none."""
    return ValueError(f"{what} needs statistics of held-out normal images; it takes held-out normals: a "
                      "validation/good folder or data.val_fraction > 0")


@dataclass(frozen=True)
class ScoreSettings:
    """How flow outputs become maps and image scores: the `model.*` keys of the same names (`ScoreSettings.of`)."""

    anomaly_map: str = "z2"  # the output map's kind
    map_norm: str = "none"  # the output map's standardisation
    image_score: str = "max"
    topk_fraction: float = 0.01
    score_norm: str = "map"  # the standardisation of the map the image score reads; map: the output map's
    score_map: str = "output"  # the kind of map the image score reads; output: the output map's

    @classmethod
    def of(cls, model) -> "ScoreSettings":
        """The score settings of a `ModelConfig` section."""
        return cls(**{f.name: getattr(model, f.name) for f in fields(cls)})

    @property
    def stats_keys(self) -> list[str]:
        """The settings that standardise by statistics of held-out normal images, as `model.<key>=<value>`."""
        keys = [f"model.map_norm={self.map_norm}"] if self.map_norm != "none" else []
        keys += [f"model.score_norm={self.score_norm}"] if self.score_norm not in ("map", "none") else []
        return keys + (["model.image_score=nll_z"] if self.image_score == "nll_z" else [])

    @property
    def needs_stats(self) -> bool:
        """Whether these settings need statistics of held-out normal images."""
        return bool(self.stats_keys)

    def missing_stats(self) -> ValueError:
        """The error for these settings where there are no held-out normal statistics."""
        return missing_stats(", ".join(self.stats_keys))

    @property
    def score_kind(self) -> str | None:
        """The kind of map the image score reads when it is not the output map's (`score_map`), else None."""
        return None if self.score_map in ("output", self.anomaly_map) else self.score_map


def image_nll(latents: list[torch.Tensor], log_jacs: list[torch.Tensor]) -> torch.Tensor:
    """`(B, n_scales)`: each scale's negative log-likelihood of the whole image, per dimension (C*h*w)."""
    per_scale = [(0.5 * torch.sum(z.float() ** 2, dim=(1, 2, 3)) - j.float().sum(dim=(1, 2))) / z[0].numel()
                 for z, j in zip(latents, log_jacs)]
    return torch.stack(per_scale, dim=1)


@dataclass
class NormalStats:
    """Statistics of held-out normal images: per-scale map mean/std (per position `(1,1,h,w)` and per scale
    `()`), and the per-scale image NLL mean/std `(n_scales,)`."""

    position_mean: list[torch.Tensor]
    position_std: list[torch.Tensor]
    scale_mean: list[torch.Tensor]
    scale_std: list[torch.Tensor]
    nll_mean: torch.Tensor
    nll_std: torch.Tensor

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, values: dict) -> "NormalStats":
        missing = set(cls.__dataclass_fields__) - set(values)
        if missing:
            raise ValueError(f"normal statistics lack {sorted(missing)}")
        return cls(**{k: values[k] for k in cls.__dataclass_fields__})

    def to(self, device: torch.device | str) -> "NormalStats":
        move = lambda v: [t.to(device) for t in v] if isinstance(v, list) else v.to(device)
        return NormalStats(**{k: move(v) for k, v in self.to_dict().items()})


def normal_stats(maps: list[torch.Tensor], nll: torch.Tensor, eps: float = 1e-6) -> NormalStats:
    """Statistics of held-out normals from their per-scale maps `[(N,1,h,w)]` and image NLLs `(N, n_scales)`.

    The per-position std is shrunk half-way (in variance) to the scale's, as a few dozen images make it noisy.
    Variances are population variances, so that a single held-out image still gives finite statistics.
    """
    if nll.shape[0] < 1:
        raise ValueError("normal statistics need at least 1 held-out normal image, got none")
    maps = [m.float() for m in maps]
    scale_mean = [m.mean() for m in maps]
    scale_var = [m.var(correction=0) for m in maps]
    position_var = [m.var(dim=0, keepdim=True, correction=0) for m in maps]
    return NormalStats(
        position_mean=[m.mean(dim=0, keepdim=True) for m in maps],
        position_std=[torch.sqrt(0.5 * (pv + sv) + eps) for pv, sv in zip(position_var, scale_var)],
        scale_mean=scale_mean, scale_std=[torch.sqrt(v + eps) for v in scale_var],
        nll_mean=nll.float().mean(dim=0), nll_std=nll.float().std(dim=0, correction=0) + eps)


def standardise(maps: list[torch.Tensor], mode: str, stats: NormalStats | None) -> list[torch.Tensor]:
    """Per-scale maps standardised by held-out normal statistics (`none`: unchanged)."""
    if mode == "none":
        return maps
    if mode not in MAP_NORMS:
        raise ValueError(f"unknown map normalisation '{mode}'; known: {', '.join(MAP_NORMS)}")
    if stats is None:
        raise missing_stats(f"model.map_norm={mode}")
    if mode == "scale":
        return [(m - mu) / sd for m, mu, sd in zip(maps, stats.scale_mean, stats.scale_std)]
    return [(m - mu) / sd for m, mu, sd in zip(maps, stats.position_mean, stats.position_std)]


def nll_image_score(nll: torch.Tensor, mode: str, stats: NormalStats | None) -> torch.Tensor:
    """`(B, n_scales) -> (B,)`: mean over scales of the image NLL (`nll`) or of its held-out z-score (`nll_z`)."""
    if mode == "nll":
        return nll.mean(dim=1)
    if mode == "nll_z":
        if stats is None:
            raise missing_stats("model.image_score=nll_z")
        return ((nll - stats.nll_mean) / stats.nll_std).mean(dim=1)
    raise ValueError(f"unknown image score '{mode}'; known: {', '.join(IMAGE_SCORES)}")


def image_score(maps: torch.Tensor, nll: torch.Tensor, settings: ScoreSettings,
                stats: NormalStats | None = None) -> torch.Tensor:
    """`(B,1,H,W)` maps and `(B, n_scales)` image NLLs -> image scores `(B,)` by `settings.image_score`."""
    if settings.image_score in NLL_SCORES:
        return nll_image_score(nll, settings.image_score, stats)
    return map_image_score(maps, settings.image_score, settings.topk_fraction)


def score_scales(per_scale: list[torch.Tensor], nll: torch.Tensor, size: tuple[int, int], settings: ScoreSettings,
                 stats: NormalStats | None = None, score_per_scale: list[torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-scale maps `[(B,1,h,w)]` and image NLLs `(B, n_scales)` -> (fused anomaly map `(B,1,H,W)`, the map
    the image score reads `(B,1,H,W)`, scores `(B,)`).

    The map is standardised by `map_norm`; the image score reads the map standardised by `score_norm`
    (`map`: the output map itself), so e.g. the score can discount the border while the map stays raw.
    `score_per_scale`: per-scale maps of another kind for the score to read (`model.score_map`; `stats` are then
    theirs and `map_norm` must be `none`).
    """
    map_norm, score_norm = settings.map_norm, settings.score_norm
    fused = fuse(standardise(per_scale, map_norm, stats), size)
    if score_per_scale is None:
        scored = fused if score_norm in ("map", map_norm) else fuse(standardise(per_scale, score_norm, stats), size)
    else:
        scored = fuse(standardise(score_per_scale, map_norm if score_norm == "map" else score_norm, stats), size)
    return fused, scored, image_score(scored, nll, settings, stats)


def score_with_map(latents: list[torch.Tensor], log_jacs: list[torch.Tensor], size: tuple[int, int],
                   settings: ScoreSettings, stats: NormalStats | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow outputs -> `score_scales` of their per-scale maps (and of the score's own kind, `score_map`)."""
    per_scale = scale_maps(settings.anomaly_map, latents, log_jacs)
    other = settings.score_kind
    score_per_scale = scale_maps(other, latents, log_jacs) if other else None
    nll = (image_nll(latents, log_jacs) if settings.image_score in NLL_SCORES
           else per_scale[0].new_zeros(len(per_scale[0]), 0))
    return score_scales(per_scale, nll, size, settings, stats, score_per_scale)


def cross_fitted(per_scale: list[torch.Tensor], nll: torch.Tensor, normal: torch.Tensor, source: torch.Tensor,
                 size: tuple[int, int], settings: ScoreSettings, score_per_scale: list[torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fused maps, the maps the image scores read, image scores) of held-out rows, each row standardised with the
    statistics of the held-out normals other than its source image (`source[r]`, an index into the rows;
    `normal`: the normal rows).

    Scored with statistics that include itself, a held-out normal looks more normal than a new part does
    (its own values set the mean and inflate the std where it is unusual): the validation AUROC is then
    optimistic, and a threshold taken as a quantile of those scores is too low. Leave-one-out scores every
    held-out image as the deployed model, whose statistics come from all of them, scores a new part.
    """
    if len(normal) < 2:
        raise ValueError(f"cross-fitted scores need at least 2 held-out normal images, got {len(normal)}")
    if not bool(torch.isin(source, normal).all()):
        raise ValueError("every row's source must be one of the normal rows")
    maps, scored = torch.empty(len(nll), 1, *size), torch.empty(len(nll), 1, *size)
    scores = torch.empty(len(nll))
    for i in normal.tolist():
        rows = torch.nonzero(source == i).flatten()
        others = normal[normal != i]
        stats = normal_stats([m[others] for m in score_per_scale or per_scale], nll[others])
        fused, read, row_scores = score_scales([m[rows] for m in per_scale], nll[rows], size, settings, stats,
                                               [m[rows] for m in score_per_scale] if score_per_scale else None)
        maps[rows], scored[rows], scores[rows] = fused.cpu().float(), read.cpu().float(), row_scores.cpu().float()
    return maps, scored, scores


OFF_DEFECT_MARGIN = 1 / 16  # of the map's side: 16 px at 256; 16 and 32 px left the same AUROC on screw and tire


def grown(masks: torch.Tensor, margin: int) -> torch.Tensor:
    """Boolean masks `(N,1,H,W)` grown by `margin` pixels (a square neighbourhood; max-pooled row- then column-wise)."""
    width = 2 * margin + 1
    rows = F.max_pool2d(masks.float(), (1, width), stride=1, padding=(0, margin))
    return F.max_pool2d(rows, (width, 1), stride=1, padding=(margin, 0)) > 0


def off_defect_scores(scored: torch.Tensor, masks: torch.Tensor, settings: ScoreSettings,
                      margin: float = OFF_DEFECT_MARGIN) -> torch.Tensor | None:
    """Image scores `(N,)` read off the score maps `(N,1,H,W)` with each image's defect region (its mask `(N,1,H,W)`
    grown by `margin` of the side) left out: what the score says about the rest of the part. An image AUROC that
    stays high on these scores ranks images by something other than their defects (None for the whole-image NLL
    scores, which cannot leave a region out)."""
    if settings.image_score not in MAP_SCORES:
        return None
    region = grown(masks, max(1, round(margin * scored.shape[-1])))
    if settings.image_score == "mean":
        kept = (~region).flatten(start_dim=1).float()
        return (scored.flatten(start_dim=1) * kept).sum(dim=1) / kept.sum(dim=1).clamp_min(1.0)
    lowest = scored.flatten(start_dim=1).min(dim=1).values.view(-1, 1, 1, 1)
    return map_image_score(torch.where(region, lowest, scored), settings.image_score, settings.topk_fraction)


def score(latents: list[torch.Tensor], log_jacs: list[torch.Tensor], size: tuple[int, int], settings: ScoreSettings,
          stats: NormalStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow outputs -> (fused anomaly map `(B,1,H,W)`, image scores `(B,)`); see `score_with_map`."""
    fused, _, scores = score_with_map(latents, log_jacs, size, settings, stats)
    return fused, scores


__all__ = ["MAP_NORMS", "IMAGE_SCORES", "NLL_SCORES", "ScoreSettings", "missing_stats", "NormalStats", "normal_stats",
           "image_nll", "standardise", "nll_image_score", "image_score", "score", "score_with_map", "score_scales",
           "cross_fitted", "off_defect_scores", "OFF_DEFECT_MARGIN"]
