"""Frozen-backbone features, computed once and reused across epochs, trials and workers.

The backbone never trains, so its features for a given (backbone, weights, input size, data)
never change. `encode` runs it once over a split; `FeatureCache` stores the result on disk
(memory-mapped on load, optional float16) under a key of everything that determines it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fastflow.runtime.config import ModelConfig

log = logging.getLogger(__name__)
CACHE_FORMAT = 1


@dataclass
class EncodedSplit:
    """Backbone features `[(N,C_i,h_i,w_i)]`, masks `(N,1,S,S)` bool and labels `(N,)` of one split."""

    features: list[torch.Tensor]
    masks: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        return [f[indices].to(device, non_blocking=True).float() for f in self.features]

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)


@torch.inference_mode()
def encode(model, dataset: Dataset, batch_size: int, device: torch.device, num_workers: int = 0,
           dtype: torch.dtype = torch.float32, desc: str = "features") -> EncodedSplit:
    """Run the frozen backbone over `dataset` once."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    chunks: list[list[torch.Tensor]] = []
    masks, labels = [], []
    for images, batch_masks, batch_labels in tqdm(loader, desc=desc, leave=False):
        features = model.extract_features(images.to(device, non_blocking=True))
        chunks.append([f.to("cpu", dtype) for f in features])
        masks.append(batch_masks.bool())
        labels.append(torch.as_tensor(batch_labels))
    per_scale = [torch.cat(scale) for scale in zip(*chunks)]
    return EncodedSplit(per_scale, torch.cat(masks), torch.cat(labels))


def cache_key(model_cfg: ModelConfig, data_hash: str, split: str, dtype: str, extra: str = "",
              exposure: float = 0.0) -> str:
    """Everything that determines the features; a change of any of them is a different entry."""
    weights = model_cfg.weights
    if weights not in ("imagenet", "none", "pypi") and Path(weights).is_file():
        stat = Path(weights).stat()
        weights = f"{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    parts = dict(format=CACHE_FORMAT, backbone=model_cfg.backbone, weights=weights, size=model_cfg.input_size,
                 indices=list(model_cfg.feature_indices), mean=model_cfg.mean, std=model_cfg.std,
                 data=data_hash, split=split, dtype=dtype, extra=extra, torch=torch.__version__)
    if model_cfg.exposure != "none":  # (absent otherwise, so that entries from before the option stay valid)
        parts["exposure"] = f"{model_cfg.exposure}:{exposure:.6f}"
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{model_cfg.backbone}-{split}-{digest}"


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class FeatureCache:
    """On-disk cache of `EncodedSplit`s: one folder per key, written atomically, size-limited (LRU).

    Each entry holds `split.pt` and `split.sha256` (its content checksum), verified on every load: a
    corrupt, truncated or unchecked entry is ignored, recomputed and replaced atomically (renames only).
    """

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def load(self, key: str) -> EncodedSplit | None:
        path = self.directory / key / "split.pt"
        if not path.is_file():
            return None
        problem = self._problem(self.directory / key)
        if problem:
            log.warning("ignoring feature cache entry %s (%s); it is recomputed and replaced", path.parent, problem)
            return None
        try:
            stored = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:  # a corrupt entry is recomputed, never trusted
            log.warning("ignoring unreadable feature cache %s (%s)", path, error)
            return None
        os.utime(path.parent)  # mark as recently used
        return EncodedSplit(stored["features"], stored["masks"], stored["labels"])

    @staticmethod
    def _problem(entry: Path) -> str:
        """Why the entry folder cannot be trusted ('' when its checksum matches)."""
        try:
            expected = (entry / "split.sha256").read_text().strip()
        except OSError:
            return "no checksum"
        try:
            actual = file_digest(entry / "split.pt")
        except OSError as error:
            return f"unreadable: {error}"
        return "" if actual == expected else f"checksum mismatch: {actual[:12]} != stored {expected[:12]}"

    def store(self, key: str, split: EncodedSplit) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        staging = self.directory / f".{key}.{os.getpid()}.tmp"
        staging.mkdir(exist_ok=True)
        torch.save({"features": split.features, "masks": split.masks, "labels": split.labels}, staging / "split.pt")
        (staging / "split.sha256").write_text(file_digest(staging / "split.pt"))
        target = self.directory / key
        try:
            os.rename(staging, target)
        except OSError:  # the key exists: stored first by another worker (identical content), or corrupt
            if target.is_dir() and self._problem(target):
                self._replace(staging, target)
            shutil.rmtree(staging, ignore_errors=True)
        self.evict()

    def _replace(self, staging: Path, target: Path) -> None:
        """Swap a corrupt entry for `staging` by renames; readers see the old, the new or no entry, never a mix."""
        displaced = self.directory / f".{target.name}.{os.getpid()}.corrupt"
        try:
            os.rename(target, displaced)
        except OSError:
            return  # replaced meanwhile by another worker
        try:
            os.rename(staging, target)
        except OSError:
            pass  # another worker put a fresh entry in place first
        shutil.rmtree(displaced, ignore_errors=True)
        log.warning("feature cache entry %s was corrupt; replaced", target.name)

    def entries(self) -> list[tuple[Path, int, float]]:
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                size = sum(f.stat().st_size for f in entry.iterdir())
                found.append((entry, size, entry.stat().st_mtime))
        return found

    def evict(self) -> None:
        """Drop least recently used entries until the cache fits `max_bytes`."""
        entries = sorted(self.entries(), key=lambda item: item[2])
        total = sum(size for _, size, _ in entries)
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            log.info("feature cache: evicted %s (%.1f MB)", path.name, size / 1e6)

    def clear(self) -> int:
        """Remove every entry; returns the bytes freed."""
        freed = sum(size for _, size, _ in self.entries())
        if self.directory.is_dir():
            shutil.rmtree(self.directory)
        return freed


def encode_cached(model, dataset: Dataset, key: str, cache: FeatureCache | None, batch_size: int,
                  device: torch.device, num_workers: int, dtype: torch.dtype, desc: str) -> EncodedSplit:
    """`encode`, through the disk cache when one is given."""
    if cache is not None:
        hit = cache.load(key)
        if hit is not None:
            log.info("feature cache hit: %s (%.1f MB)", key, hit.nbytes() / 1e6)
            return hit
    start = time.perf_counter()
    split = encode(model, dataset, batch_size, device, num_workers, dtype, desc)
    log.info("encoded %d images for %s in %.1f s", len(split), desc, time.perf_counter() - start)
    if cache is not None:
        cache.store(key, split)
    return split
