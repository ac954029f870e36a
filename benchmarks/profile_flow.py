"""Where a FastFlow training epoch spends its time (used by benchmark.py; CPU or CUDA).

Times are CPU seconds on the CPU (wall seconds on CUDA).
- `epoch_phases`: one epoch of the uncached path (feature_cache=off), timed by phase: image loading and
  decoding, backbone, flow forward (LayerNorm + flows), loss, backward, optimizer step. It repeats the body
  of `fastflow.train.train_epoch` with timers between the same library calls.
- `top_ops`: torch.profiler over one training step on cached features, self time per operator.
- `permutation_whatif`: a flow training step with FrEIA's hard channel permutation done as it is now (a
  1x1 conv with a CxC permutation matrix, forward and backward) and as channel indexing, same results.
  The patch only lives inside the `with` block of this process; fastflow/ is not changed.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader

from fastflow.config import RunConfig
from fastflow.data import ImageDataset, make_splits
from fastflow.flow import PositionLogJacBlock
from fastflow.loss import nll_loss
from fastflow.model import FastFlow
from fastflow.train import seed_everything


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(device: torch.device):
    """CPU seconds on the CPU (robust to other jobs on a shared machine), wall seconds on CUDA."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def epoch_phases(cfg: RunConfig, device: torch.device) -> tuple[dict[str, float], list[torch.Tensor], FastFlow]:
    """Seconds per phase of one uncached epoch; also the last batch's features and the model."""
    seed_everything(cfg.train.seed)
    model = FastFlow(cfg.model).to(device)
    splits = make_splits(cfg.data, cfg.train.max_train_images, cfg.train.seed)
    loader = DataLoader(ImageDataset(splits.train, cfg.model.input_size), batch_size=cfg.train.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(cfg.train.seed))
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model.train()
    model.backbone.eval()
    phases: dict[str, float] = defaultdict(float)
    now_fn = _clock(device)
    clock = now_fn()

    def lap(name: str) -> None:
        nonlocal clock
        _sync(device)
        now = now_fn()
        phases[name] += now - clock
        clock = now

    features: list[torch.Tensor] = []
    for images, _, _ in loader:
        images = images.to(device)
        lap("load + decode + resize images")
        features = model.extract_features(images)
        lap("backbone forward")
        latents, log_jacs = model.forward_features(features)
        lap("flow forward (LayerNorm + flows)")
        loss = nll_loss(latents, log_jacs)
        lap("loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lap("backward")
        optimizer.step()
        loss.item()
        lap("optimizer step")
    return dict(phases), [f.detach() for f in features], model


def top_ops(model: FastFlow, features: list[torch.Tensor], rows: int = 8) -> tuple[list[tuple[str, float]], float]:
    """(operator, self seconds) of one training step on cached features, largest first; and the total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if features[0].is_cuda else [])
    _train_step(model, features)  # warm-up
    with profile(activities=activities) as prof:
        _train_step(model, features)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e6) for e in events[:rows]], total


def _train_step(model: FastFlow, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward + backward (gradients discarded, parameters unchanged)."""
    model.train()
    latents, log_jacs = model.forward_features(features)
    nll_loss(latents, log_jacs).backward()
    model.zero_grad(set_to_none=True)
    _sync(features[0].device)
    return latents, log_jacs


@contextmanager
def index_permutation():
    """Inside the block, PositionLogJacBlock permutes channels by indexing instead of a 1x1 conv."""
    original = PositionLogJacBlock._permute

    def _permute(self, x, rev=False):
        if rev or self.GIN or self.householder:
            return original(self, x, rev)
        order = self.w_perm.flatten(1).argmax(dim=1)  # conv2d(x, w)[:, i] = x[:, j] where w[i, j] = 1
        scale = self.global_scale_activation(self.global_scale)
        return (x * scale + self.global_offset)[:, order], torch.sum(torch.log(scale))

    PositionLogJacBlock._permute = _permute
    try:
        yield
    finally:
        PositionLogJacBlock._permute = original


def permutation_whatif(model: FastFlow, features: list[torch.Tensor], repeats: int = 2) -> dict[str, float]:
    """Median seconds of a flow forward+backward step, stock vs index permutation, and the output difference."""
    now = _clock(features[0].device)

    def timed() -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        _train_step(model, features)  # warm-up
        times = []
        for _ in range(repeats):
            start = now()
            latents, log_jacs = _train_step(model, features)
            times.append(now() - start)
        return statistics.median(times), latents, log_jacs

    stock, z_stock, j_stock = timed()
    with index_permutation():
        indexed, z_index, j_index = timed()
    difference = max([(a - b).abs().max().item() for a, b in zip(z_stock, z_index)]
                     + [(a - b).abs().max().item() for a, b in zip(j_stock, j_index)])
    return {"stock_s": stock, "index_s": indexed, "speedup": stock / indexed, "max_abs_diff": difference,
            "batch": features[0].shape[0]}


def random_features(model: FastFlow, batch: int, device: torch.device) -> list[torch.Tensor]:
    """Random backbone-shaped features `[(B,C_i,h_i,w_i)]` for a flow-only measurement."""
    size = model.cfg.input_size
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, size // s, size // s, generator=generator).to(device)
            for c, s in zip(model.backbone.channels, model.backbone.strides)]
