"""Loading `.pt` files from users safely: tensors and plain containers only, never pickled code.

Every `torch.load` of a file the user names (checkpoints for predict/export/pyfunc, backbone weights)
goes through `load_tensors`: `weights_only=True`, and a corrupt or foreign file becomes one clear
`CheckpointError` naming the file instead of torch's advice to disable the safety check.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from fastflow.runtime.faults import first_sentence


class CheckpointError(ValueError):
    """A `.pt` file is missing, corrupt, or holds something other than tensors and plain data."""


def load_tensors(path: Path, what: str = "checkpoint", mmap: bool = False, label: str = "") -> object:
    """`torch.load(path, weights_only=True)` on CPU; errors name the file (or `label`) and what was expected."""
    path = Path(path)
    name = label or str(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {name}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:  # weights_only refused a global: code, not data
        detail = first_sentence(str(error).split("WeightsUnpickler error:")[-1])
        raise CheckpointError(f"{what} {name}: refused to load: it holds Python objects, not only tensors "
                              f"({detail}); files are loaded as data, never as code") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as error:
        first = first_sentence(str(error)) or type(error).__name__
        raise CheckpointError(f"{what} {name}: not a readable PyTorch file (corrupt or truncated? {first})") from None


def load_checkpoint(path: Path, label: str = "") -> dict:
    """A FastFlow checkpoint (`train.make_checkpoint`): a dict with config, state_dict and thresholds."""
    checkpoint = load_tensors(path, "checkpoint", label=label)
    required = ("config", "state_dict", "thresholds", "threshold_kind", "score_range")
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {label or path}: not a FastFlow checkpoint (missing {', '.join(missing)}); "
                              f"expected the checkpoint.pt that `fastflow train` logs")
    return checkpoint


__all__ = ["CheckpointError", "load_tensors", "load_checkpoint"]
