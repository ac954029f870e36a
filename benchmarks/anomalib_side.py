"""anomalib's FastFlow on the benchmark's data: run with the anomalib venv's python, never the project's.

    benchmarks/.venv-anomalib/bin/python benchmarks/anomalib_side.py HANDOFF_DIR

HANDOFF_DIR (written by benchmark.py or side_by_side.py) holds `spec.json` (settings; `every_epoch`: also save the
test maps after every epoch as `anomalib_maps_epoch<E>.npz`), `data.pt` (uint8 train/test images at
the input size, exactly the tensors the project's ImageDataset produced) and optionally `backbone.pt`
(timm-named backbone weights, so both sides use the same backbone). Trains anomalib's torch module
`FastflowModel` with a plain loop (Adam, anomalib's `FastflowLoss`, the settings of anomalib's Lightning
module), times every epoch and a full-model inference pass (normalize + backbone + flows + anomaly map),
writes the test maps to `HANDOFF_DIR/anomalib_maps.npz` and prints one JSON line. Metrics are computed by
benchmark.py with the project's metric code, so both sides are scored identically.

anomalib accepts only resnet18/wide_resnet50_2/deit/cait; `CnnFastflowModel` below builds the same model
from anomalib's own parts for any timm CNN (e.g. tf_efficientnet_lite0).
"""

from __future__ import annotations

import json
import random
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from anomalib.models.image.fastflow.anomaly_map import AnomalyMapGenerator
from anomalib.models.image.fastflow.loss import FastflowLoss
from anomalib.models.image.fastflow.torch_model import FastflowModel, create_fast_flow_block

ANOMALIB_BACKBONES = {"resnet18", "wide_resnet50_2", "cait_m48_448", "deit_base_distilled_patch16_384"}
# Weights anomalib's forward never uses (ViT blocks after index 7, classifier heads): may be absent.
UNUSED_KEYS = re.compile(r"^(blocks\.([89]|1\d|[2-9]\d)\.|head|head_dist|fc\.|classifier|conv_head|bn2)")


class CnnFastflowModel(FastflowModel):
    """anomalib's FastflowModel (its flows, LayerNorms, map and forward) on any timm features_only CNN."""

    def __init__(self, input_size: tuple[int, int], backbone: str, out_indices: list[int], flow_steps: int,
                 conv3x3_only: bool, hidden_ratio: float) -> None:
        nn.Module.__init__(self)
        self.input_size = input_size
        self.feature_extractor = timm.create_model(backbone, pretrained=False, features_only=True,
                                                   out_indices=out_indices)
        channels = self.feature_extractor.feature_info.channels()
        scales = self.feature_extractor.feature_info.reduction()
        self.norms = nn.ModuleList(
            nn.LayerNorm([c, int(input_size[0] / s), int(input_size[1] / s)], elementwise_affine=True)
            for c, s in zip(channels, scales, strict=True))
        for parameter in self.feature_extractor.parameters():
            parameter.requires_grad = False
        self.fast_flow_blocks = nn.ModuleList(
            create_fast_flow_block([c, int(input_size[0] / s), int(input_size[1] / s)], conv3x3_only, hidden_ratio,
                                   flow_steps)
            for c, s in zip(channels, scales, strict=True))
        self.anomaly_map_generator = AnomalyMapGenerator(input_size=input_size)


def build_model(spec: dict) -> nn.Module:
    size = (spec["input_size"], spec["input_size"])
    stock = spec["backbone"] in ANOMALIB_BACKBONES and (
        spec["backbone"] not in {"resnet18", "wide_resnet50_2"} or list(spec["feature_indices"]) == [1, 2, 3])
    if stock:
        return FastflowModel(size, spec["backbone"], pre_trained=False, flow_steps=spec["flow_steps"],
                             conv3x3_only=spec["conv3x3_only"], hidden_ratio=spec["hidden_ratio"])
    return CnnFastflowModel(size, spec["backbone"], list(spec["feature_indices"]), spec["flow_steps"],
                            spec["conv3x3_only"], spec["hidden_ratio"])


def load_backbone(model: nn.Module, path: Path) -> int:
    """Load timm-named weights into the feature extractor; every key anomalib's forward uses must be there."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.feature_extractor.state_dict()
    missing = [k for k in own if k not in state and not UNUSED_KEYS.match(k)]
    if missing:
        raise SystemExit(f"backbone weights lack {len(missing)} tensors anomalib needs, e.g. {missing[:3]}")
    for key in own:
        if key in state and tuple(state[key].shape) != tuple(own[key].shape):
            raise SystemExit(f"backbone weight {key}: shape {tuple(state[key].shape)} != {tuple(own[key].shape)}")
    model.feature_extractor.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return sum(1 for k in own if k in state)


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries the parent's high-water mark
    over fork+exec into the child's ru_maxrss, so there it would report benchmark.py's peak."""
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def main(handoff: Path) -> None:
    spec = json.loads((handoff / "spec.json").read_text())
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    data = torch.load(handoff / "data.pt", weights_only=True)
    random.seed(spec["seed"])
    np.random.seed(spec["seed"])  # FrEIA draws its channel permutations from numpy
    torch.manual_seed(spec["seed"])
    model = build_model(spec)
    loaded = load_backbone(model, handoff / "backbone.pt") if (handoff / "backbone.pt").is_file() else 0
    model.to(device)
    mean = torch.tensor(spec["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"], device=device).view(1, 3, 1, 1)
    prepare = lambda images: (images.to(device).float() / 255.0 - mean) / std  # anomalib's pre-processor step
    loss_fn = FastflowLoss()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=spec["lr"],
                                 weight_decay=spec["weight_decay"])
    generator = torch.Generator().manual_seed(spec["seed"])
    train, test = data["train"], data["test"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_mb()
    epoch_seconds, epoch_cpu_seconds, losses = [], [], []
    for _ in range(spec["epochs"]):
        model.train()
        start, cpu_start, total = time.perf_counter(), time.process_time(), 0.0
        order = torch.randperm(len(train), generator=generator)
        for first in range(0, len(order), spec["batch_size"]):
            images = prepare(train[order[first:first + spec["batch_size"]]])
            hidden_variables, jacobians = model(images)
            loss = loss_fn(hidden_variables, jacobians)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds.append(time.perf_counter() - start)
        epoch_cpu_seconds.append(time.process_time() - cpu_start)
        losses.append(total / len(train))
        if spec.get("every_epoch"):  # the side-by-side table: test maps after every epoch, scored by the caller
            maps, scores, _, _ = infer(model, test, prepare, spec["eval_batch_size"], device)
            np.savez(handoff / f"anomalib_maps_epoch{len(losses)}.npz", maps=maps, scores=scores)
    maps, scores, seconds, cpu_seconds = infer(model, test, prepare, spec["eval_batch_size"], device)
    np.savez(handoff / "anomalib_maps.npz", maps=maps, scores=scores)
    result = {
        "anomalib": __import__("anomalib").__version__, "torch": torch.__version__, "timm": timm.__version__,
        "model": type(model).__name__, "backbone_tensors_loaded": loaded, "epoch_seconds": epoch_seconds,
        "epoch_cpu_seconds": epoch_cpu_seconds, "losses": losses, "inference_images_per_s": len(test) / seconds,
        "inference_images_per_cpu_s": len(test) / cpu_seconds, "train_images": len(train),
        "test_images": len(test),
        "flow_parameters": sum(p.numel() for p in model.fast_flow_blocks.parameters() if p.requires_grad),
        "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base_rss,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "maps": str(handoff / "anomalib_maps.npz"),
    }
    print(json.dumps(result))


@torch.inference_mode()
def infer(model: nn.Module, test: torch.Tensor, prepare, batch_size: int,
          device: torch.device) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Full-model inference `(N,3,S,S)` uint8 -> maps `(N,S,S)`, scores `(N,)`, wall and CPU seconds (after a
    warm-up batch)."""
    model.eval()
    model(prepare(test[:batch_size]))  # warm-up, not timed (same protocol as benchmark.py)
    maps, scores = [], []
    start, cpu_start = time.perf_counter(), time.process_time()
    for first in range(0, len(test), batch_size):
        output = model(prepare(test[first:first + batch_size]))
        maps.append(output.anomaly_map[:, 0].float().cpu())
        scores.append(output.pred_score.reshape(-1).float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return torch.cat(maps).numpy(), torch.cat(scores).numpy(), seconds, cpu_seconds


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
