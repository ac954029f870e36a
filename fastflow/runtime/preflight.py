"""What can be checked about a configuration before torch/timm are imported: backbone strides, device names, the
category folder's name, a GPU driver's presence.

Pure rules, no imports of heavy libraries: a wrong value fails in milliseconds with the key named,
instead of half a minute later inside a LayerNorm or torch's device parser.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

# timm CNN families whose `features_only` stage i has reduction 2**(i+1) (stem stride 2, then one /2 per stage).
_CNN_STAGE_DOUBLING = ("resnet", "resnext", "wide_resnet", "resnetv2", "seresnet", "seresnext", "efficientnet",
                       "tf_efficientnet", "efficientnetv2", "tf_efficientnetv2", "mobilenetv2", "mobilenetv3",
                       "tf_mobilenetv3", "mnasnet", "regnetx", "regnety")
_TRANSFORMER = ("deit", "deit3", "cait", "vit", "eva", "beit", "beitv2")
_PATCH = re.compile(r"patch(\d+)")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def max_stride(backbone: str, feature_indices: tuple[int, ...]) -> Optional[int]:
    """The largest feature-map reduction of `backbone` at `feature_indices`, when known without timm."""
    family = backbone.split(".")[0]
    if family.split("_")[0] in _TRANSFORMER:
        found = _PATCH.search(family)
        return int(found.group(1)) if found else 16  # CaiT names carry no patch size; all timm CaiTs use 16
    if any(family == name or family.startswith(name) for name in _CNN_STAGE_DOUBLING):
        return 2 ** (max(feature_indices) + 1)
    return None


def input_size_problem(backbone: str, feature_indices: tuple[int, ...], input_size: int) -> Optional[str]:
    """Why `input_size` does not fit the backbone's strides (every feature map must tile the image), or None."""
    stride = max_stride(backbone, feature_indices)
    if stride is None or input_size % stride == 0:
        return None
    low, high = input_size // stride * stride, (input_size // stride + 1) * stride
    return (f"a multiple of {stride} (the largest stride of {backbone} at feature_indices "
            f"{list(feature_indices)}), e.g. {low or high} or {high}")


def device_problem(device: str) -> Optional[str]:
    """None for auto, cpu, mps, cuda, cuda:N; otherwise what is allowed."""
    return None if DEVICE.match(device) else "auto, cpu, cuda, cuda:N or mps"


def category_problem(category: str) -> Optional[str]:
    """What `data.category` must be when it is not one folder directly inside `data.root`, or None: a path
    (`../outside/tirex`, `a/b`, an absolute one) would read a folder outside the data root."""
    if category in ("", ".", "..") or "/" in category or "\\" in category or "\0" in category:
        return "the name of one folder directly inside data.root (no '/' or '\\'; not '.' or '..')"
    return None


_GPU_DEVICE_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg")  # NVIDIA, ROCm, WSL


def missing_gpu(device: str) -> Optional[str]:
    """Why `device` (cuda, cuda:N) cannot exist on this machine, judged in milliseconds from its device files
    (no GPU driver at all), or None. torch has the last word (`device.resolve_device`)."""
    if not device.startswith("cuda") or any(Path(path).exists() for path in _GPU_DEVICE_FILES):
        return None
    return (f"train.device={device!r} but this machine has no GPU driver ({', '.join(_GPU_DEVICE_FILES[:2])} "
            "absent); use auto or cpu")


__all__ = ["max_stride", "input_size_problem", "device_problem", "category_problem", "missing_gpu"]
