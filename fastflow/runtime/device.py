"""The device a run uses and its peak memory (resident memory of the process, and allocated GPU memory)."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start this run's peak-memory window (Linux: clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory since `reset_peak_memory` and, on CUDA, peak allocated GPU memory."""
    try:
        status = Path("/proc/self/status").read_text()
        rss = float(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = {"rss": rss}
    if device.type == "cuda":
        peak["cuda"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use auto or cpu")
    return torch.device(name)
