"""Backbone features for training and evaluation: every split encoded once (through the disk cache when enabled),
and the training batches of an epoch, from the cache or by running the backbone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from fastflow.core.model import FastFlow
from fastflow.data.dataset import ImageDataset, Splits, anomaly_spec, content_hash, make_splits, mean_level
from fastflow.data.features import EncodedSplit, FeatureCache, cache_key, encode, encode_cached
from fastflow.engine.reference import knn_reference
from fastflow.runtime.config import RunConfig
from fastflow.runtime.device import resolve_device


@dataclass
class Encoded:
    train: Optional[EncodedSplit]  # None when train.feature_cache is off
    validation: Optional[EncodedSplit]
    test: EncodedSplit
    keys: dict[str, str] = field(default_factory=dict)  # split name -> its feature-cache key


def encode_splits(model: FastFlow, cfg: RunConfig, splits: Splits, device: torch.device) -> Encoded:
    """Backbone features of every split (train only when caching), through the disk cache if enabled. With
    `model.exposure: mean`, the model's reference level is first set from the training images."""
    size, t = cfg.model.input_size, cfg.train
    cache = FeatureCache(Path(t.cache_dir), int(t.cache_max_gb * 1e9)) if t.feature_cache == "disk" else None
    dtype = getattr(torch, t.cache_dtype)
    level = mean_level(splits.train, size) if cfg.model.exposure != "none" else 0.0
    if cfg.model.exposure != "none":
        model.set_exposure_level(level)

    keys: dict[str, str] = {}

    def run(samples, split_name, anomalies=None, encode=True):
        dataset = ImageDataset(samples, size, anomalies, seed=t.seed)
        defects = f"anomalies={anomalies.cache_tag()}-seed{t.seed}" if anomalies else ""  # generated per seed
        keys[split_name] = cache_key(cfg.model, content_hash(samples), split_name, t.cache_dtype, defects, level)
        return encode_cached(model, dataset, keys[split_name], cache, cfg.eval.batch_size, device,
                             cfg.data.num_workers, dtype, split_name) if encode else None

    train = run(splits.train, "train", encode=t.feature_cache != "off")
    validation = run(splits.validation, "validation", anomaly_spec(cfg.data)) if splits.validation else None
    return Encoded(train, validation, run(splits.test, "test"), keys)


def train_features(model: FastFlow, cfg: RunConfig, samples: list, encoded: Encoded,
                   device: torch.device) -> EncodedSplit:
    """The training images' features: the encoded ones, or a backbone pass when the feature cache is off."""
    if encoded.train is not None:
        return encoded.train
    return encode(model, ImageDataset(samples, cfg.model.input_size), cfg.eval.batch_size, device,
                  cfg.data.num_workers, desc="train features")


def reference_of(cfg: RunConfig) -> dict[str, float]:
    """`fastflow reference`: the kNN reference of `cfg`'s data and backbone features alone, with no flow trained (the
    same features, cache entries and `reference/*` values a training run of `cfg` logs)."""
    device = resolve_device(cfg.train.device)
    splits = make_splits(cfg.data, cfg.train.max_train_images, cfg.train.seed)
    model = FastFlow(cfg.model).to(device)
    encoded = encode_splits(model, cfg, splits, device)
    return knn_reference(cfg, model.backbone.strides, lambda: train_features(model, cfg, splits.train, encoded, device),
                         encoded).metrics


def train_batches(model: FastFlow, cfg: RunConfig, splits: Splits, encoded: Encoded, device: torch.device,
                   generator: torch.Generator):
    """Yield per-scale feature batches for one epoch, from the cache or by running the backbone."""
    if encoded.train is not None:
        order = torch.randperm(len(encoded.train), generator=generator)
        for start in range(0, len(order), cfg.train.batch_size):
            yield encoded.train.batch(order[start:start + cfg.train.batch_size], device)
        return
    dataset = ImageDataset(splits.train, cfg.model.input_size)
    order = torch.randperm(len(dataset), generator=generator).tolist()  # the same order as the cached path
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=order,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    for images, _, _ in loader:
        yield model.extract_features(images.to(device, non_blocking=True))
