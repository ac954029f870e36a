#!/usr/bin/env python
"""FastFlow speed benchmark: the backbone-feature cache (train.feature_cache off|memory|disk) on a real
MVTec-layout sample, and optionally anomalib 2.7.0's FastFlow on the same data and settings.

    .venv/bin/python benchmarks/benchmark.py                      # cache modes, 3 presets (~9 min, 2 idle cores)
    .venv/bin/python benchmarks/benchmark.py --compare-anomalib   # + anomalib side by side (~13 min)
    .venv/bin/python benchmarks/benchmark.py --quick              # smaller sets, no DeiT (~4 min)

Everything runs in this one process (anomalib in a child process of its own venv), so speed is compared
as ratios measured minutes apart on the same machine. Training uses the library API:
`fastflow.engine.train.train_and_evaluate(load_config(preset, overrides))` with tracking disabled. See README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")  # train_and_evaluate's progress bars

# glibc returns freed blocks above a moving threshold to the kernel, so later allocations page-fault again:
# up to half of EfficientNet's inference CPU time, and how much depends on what the process ran before
# (measured: a fresh process 2x slower than one that had trained ResNet18). Both sides therefore run with
# the same fixed malloc settings (inherited by the anomalib child); --system-malloc keeps glibc's defaults.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000"}

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastflow.core import metrics as M  # noqa: E402
from fastflow.core.backbone import full_model_state  # noqa: E402
from fastflow.data.dataset import ImageDataset, category_dir, list_good, list_test, make_splits  # noqa: E402
from fastflow.runtime.config import RunConfig, load_config  # noqa: E402
from fastflow.serve.inference import Predictor  # noqa: E402
import fastflow.engine.train  # noqa: E402
from fastflow.engine.train import train_and_evaluate  # noqa: E402
from fastflow.runtime.device import resolve_device  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_flow  # noqa: E402

ANOMALIB_VENV = REPO / "benchmarks" / ".venv-anomalib"
ANOMALIB_SIDE = REPO / "benchmarks" / "anomalib_side.py"
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "mvtec3d_tire"


@dataclass(frozen=True)
class Preset:
    """A paper preset (experiments/<file>) run with `weights`; `fallback` settings if the file is missing."""

    file: str
    weights: str
    fallback: tuple[str, ...]
    full: dict  # train_images (0: all), epochs, test_images (0: all), modes
    quick: dict = field(default_factory=dict)


FLOW_R18 = ("model.input_size=256", "model.feature_indices=[1,2,3]", "model.flow_steps=8",
            "model.conv3x3_only=true", "model.hidden_ratio=1.0", "train.batch_size=32", "train.lr=1e-3",
            "train.weight_decay=1e-5")
PRESETS = {
    "resnet18": Preset("resnet18.yaml", "none", ("model.backbone=resnet18",) + FLOW_R18,
                       full=dict(train_images=64, epochs=3, test_images=0, modes="off,memory,disk"),
                       quick=dict(train_images=32, epochs=2, test_images=24, modes="off,memory,disk")),
    "efficientnet_lite0": Preset("efficientnet_lite0.yaml", "pypi",
                                 ("model.backbone=tf_efficientnet_lite0", "model.mean=[0.5,0.5,0.5]",
                                  "model.std=[0.5,0.5,0.5]") + FLOW_R18,
                                 full=dict(train_images=0, epochs=2, test_images=0, modes="off,memory,disk"),
                                 quick=dict(train_images=64, epochs=2, test_images=24, modes="off,memory,disk")),
    "deit": Preset("deit.yaml", "none",
                   ("model.backbone=deit_base_distilled_patch16_384", "model.input_size=384",
                    "model.feature_indices=[7]", "model.flow_steps=20", "model.conv3x3_only=false",
                    "model.hidden_ratio=0.16", "train.batch_size=32", "train.lr=1e-3", "train.weight_decay=1e-5",
                    "train.cache_dtype=float16"),
                   full=dict(train_images=16, epochs=2, test_images=12, modes="off,memory"),
                   quick=dict(train_images=8, epochs=1, test_images=8, modes="off,memory")),
}


# ---------------------------------------------------------------- measuring


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


class PeakMemory:
    """Peak RSS (getrusage) and CUDA peak inside a `with` block; the RSS peak is reset on entry where Linux
    allows it (/proc/self/clear_refs), otherwise it is the process's peak so far (`reset` False)."""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.base = rss_mb()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


class EncodeLog(logging.Handler):
    """Collects fastflow.features' "encoded N images for SPLIT in S s" records (one-time backbone cost)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("encoded") and len(record.args or ()) == 3:
            _, split, seconds = record.args
            self.seconds[split] = self.seconds.get(split, 0.0) + float(seconds)


class EpochCpuTime:
    """CPU seconds of each `fastflow.engine.train.train_epoch` call inside the block (the wall seconds come from
    train_and_evaluate's history). Wrapping only measures; with 1 torch thread, CPU time is the work done,
    whatever other jobs on a shared machine take from the wall clock."""

    def __enter__(self) -> list[float]:
        self.seconds: list[float] = []
        self.original = fastflow.engine.train.train_epoch

        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds.append(time.process_time() - start)

        fastflow.engine.train.train_epoch = timed
        return self.seconds

    def __exit__(self, *exc) -> None:
        fastflow.engine.train.train_epoch = self.original


def run_ours(cfg: RunConfig) -> dict:
    """train_and_evaluate(cfg) with timings, peak memory and last-epoch metrics."""
    log = EncodeLog()
    logger = logging.getLogger("fastflow.data.features")
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    try:
        with PeakMemory() as memory, EpochCpuTime() as cpu:
            start = time.perf_counter()
            result = train_and_evaluate(cfg)
            wall = time.perf_counter() - start
    finally:
        logger.removeHandler(log)
    epochs = [h["train/epoch_seconds"] for h in result.history]
    last = result.history[-1]
    return {"epoch_seconds": epochs, "s_per_epoch": statistics.median(epochs), "epoch_cpu_seconds": cpu,
            "cpu_s_per_epoch": statistics.median(cpu) if cpu else None, "encode_s": log.seconds,
            "wall_s": wall, "peak_rss_mb": memory.peak, "base_rss_mb": memory.base, "rss_reset": memory.reset,
            "cuda_peak_mb": memory.cuda, "loss": last["train/loss"], "flow_parameters": result.flow_parameters,
            **{k: last.get(f"eval/{k}") for k in ("image_auroc", "pixel_auroc", "aupro")},
            "checkpoint": result.checkpoint}


def load_split(samples, size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """uint8 images `(N,3,S,S)` (exactly ImageDataset's values x255), masks `(N,1,S,S)`, labels `(N,)`."""
    dataset = ImageDataset(samples, size)
    rows = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([r[0] for r in rows]).mul(255).round().to(torch.uint8)
    return images, torch.stack([r[1] for r in rows]), np.array([r[2] for r in rows])


@torch.inference_mode()
def full_model_speed(checkpoint: dict, images: torch.Tensor, batch: int, device: torch.device) -> tuple[float, float]:
    """Images per wall and per CPU second of the full model (normalize, backbone, flows, map, score)."""
    predictor = Predictor(checkpoint, str(device)).eval()
    prepare = lambda x: x.to(device).float() / 255.0
    predictor(prepare(images[:batch]))  # warm-up, not timed
    start, cpu_start = time.perf_counter(), time.process_time()
    for first in range(0, len(images), batch):
        predictor(prepare(images[first:first + batch]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start), len(images) / (time.process_time() - cpu_start)


# ---------------------------------------------------------------- anomalib side


def ensure_anomalib_venv(venv: Path) -> Path:
    """anomalib 2.7.0 in its own venv (never a dependency of the project); created on first use."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import anomalib"], capture_output=True).returncode == 0:
        return python
    print(f"setting up {venv} (torch 2.14.1 from the local wheels, then anomalib 2.7.0; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.14.1", "torchvision==0.29.1"], check=True)
    subprocess.run(pip + ["anomalib==2.7.0"], check=True)
    return python


def backbone_state(cfg: RunConfig, checkpoint: dict) -> dict[str, torch.Tensor]:
    """The backbone our run used, in timm's naming: from the checkpoint (random init), else the mapped weights."""
    prefix = "backbone.model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    return state or full_model_state(cfg.model.backbone, cfg.model.weights)


def run_anomalib(python: Path, cfg: RunConfig, checkpoint: dict, train: torch.Tensor, test: torch.Tensor,
                 workdir: Path, threads: int, device: torch.device, extra_spec: dict | None = None,
                 backbone: dict | None = None) -> dict:
    """anomalib_side.py in the anomalib venv on the same tensors, backbone (default: the checkpoint's, see
    `backbone_state`) and settings (plus `extra_spec`); its JSON result."""
    workdir.mkdir(parents=True, exist_ok=True)
    m, t = cfg.model, cfg.train
    spec = {"backbone": m.backbone, "input_size": m.input_size, "feature_indices": list(m.feature_indices),
            "flow_steps": m.flow_steps, "conv3x3_only": m.conv3x3_only, "hidden_ratio": m.hidden_ratio,
            "lr": t.lr, "weight_decay": t.weight_decay, "batch_size": t.batch_size,
            "eval_batch_size": cfg.eval.batch_size, "seed": t.seed, "epochs": t.epochs, "threads": threads,
            "device": str(device), "mean": checkpoint["state_dict"]["mean"].flatten().tolist(),
            "std": checkpoint["state_dict"]["std"].flatten().tolist(), **(extra_spec or {})}
    (workdir / "spec.json").write_text(json.dumps(spec))
    torch.save({"train": train, "test": test}, workdir / "data.pt")
    torch.save(backbone if backbone is not None else backbone_state(cfg, checkpoint), workdir / "backbone.pt")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    done = subprocess.run([str(python), str(ANOMALIB_SIDE), str(workdir)], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"anomalib side failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------- data and configs


def make_view(root: Path, category: str, test_images: int, destination: Path) -> Path:
    """A symlinked MVTec view of `root/category`: all train/good, the test set (or an evenly spread subset,
    half good and half defective, with masks); no validation/good. Returns the view's root."""
    source = category_dir(root, category)
    view = destination / category
    for sample in list_good(source / "train" / "good", "training"):
        _link(sample.image, view / "train" / "good" / sample.image.name)
    test = list_test(source)
    if test_images:
        good = [s for s in test if s.label == 0]
        bad = [s for s in test if s.label == 1]
        spread = lambda rows, n: [rows[int(i)] for i in np.unique(np.linspace(0, len(rows) - 1, n).round())]
        test = spread(good, test_images // 2) + spread(bad, test_images - test_images // 2)
    for sample in test:
        _link(sample.image, view / "test" / sample.defect / sample.image.name)
        if sample.mask is not None:
            _link(sample.mask, view / "ground_truth" / sample.defect / sample.mask.name)
    return destination


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(target).resolve())


def preset_config(name: str, plan: dict, view: Path, category: str, cache_dir: Path, device: str) -> RunConfig:
    """The preset file (or its fallback settings) with the benchmark's overrides; feature_cache set per run."""
    preset = PRESETS[name]
    path = REPO / "experiments" / preset.file
    overrides = [] if path.is_file() else list(preset.fallback)
    overrides += [f"model.weights={preset.weights}", f"data.root={view}", f"data.category={category}",
                  f"train.epochs={plan['epochs']}", f"train.max_train_images={plan['train_images']}",
                  "train.seed=0", f"train.device={device}", f"train.cache_dir={cache_dir}", "train.warmup_epochs=0",
                  f"eval.eval_every={plan['epochs']}", "eval.heatmap_images=0", "tracking.enabled=false"]
    return load_config(path if path.is_file() else None, overrides)


def with_cache(cfg: RunConfig, mode: str) -> RunConfig:
    from fastflow.runtime.config import with_overrides

    return with_overrides(cfg, {"train": {"feature_cache": mode}})


# ---------------------------------------------------------------- the run


def bench_preset(name: str, plan: dict, args, view: Path, workdir: Path, python: Path | None) -> dict:
    """Every cache mode of one preset, full-model inference speed, and (optionally) anomalib."""
    base = preset_config(name, plan, view, args.category, workdir / "cache" / name, args.device)
    device = resolve_device(base.train.device)
    m = base.model
    print(f"\n## {name}: {m.backbone} weights={m.weights} {m.input_size}px, flow_steps={m.flow_steps} "
          f"conv3x3_only={m.conv3x3_only} hidden_ratio={m.hidden_ratio}, {m.anomaly_map} map, "
          f"batch {base.train.batch_size}, "
          f"lr {base.train.lr} wd {base.train.weight_decay}, {plan['epochs']} epochs, "
          f"train images {plan['train_images'] or 'all'}, test images {plan['test_images'] or 'all'}", flush=True)
    out = {"preset": name, "plan": plan, "settings": {"backbone": m.backbone, "weights": m.weights,
           "input_size": m.input_size, "flow_steps": m.flow_steps, "conv3x3_only": m.conv3x3_only,
           "hidden_ratio": m.hidden_ratio, "anomaly_map": m.anomaly_map, "cache_dtype": base.train.cache_dtype},
           "modes": {}}
    for mode in plan["modes"].split(","):
        row = run_ours(with_cache(base, mode))
        if mode == "disk":
            row["disk_cache_mb"] = sum(f.stat().st_size for f in (workdir / "cache" / name).rglob("*")
                                       if f.is_file()) / 2**20
        out["modes"][mode] = row
        print(f"   ours cache={mode:6s}: {row['s_per_epoch']:7.1f} s/epoch {fmt_list(row['epoch_seconds'])} "
              f"CPU {fmt_list(row['epoch_cpu_seconds'])}, "
              f"encode {fmt_encode(row['encode_s'])}, wall {row['wall_s']:.0f} s, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB, AUROC img {fmt(row['image_auroc'])} "
              f"px {fmt(row['pixel_auroc'])}, load {os.getloadavg()[0]:.1f}", flush=True)
    checkpoint = next(iter(out["modes"].values()))["checkpoint"]
    splits = make_splits(base.data, base.train.max_train_images, base.train.seed)
    test, masks, labels = load_split(splits.test, m.input_size)
    out["train_images"], out["test_images"] = len(splits.train), len(test)
    out["inference_images_per_s"], out["inference_images_per_cpu_s"] = full_model_speed(
        checkpoint, test, base.eval.batch_size, device)
    print(f"   ours full-model inference: {out['inference_images_per_s']:.2f} images/s "
          f"({out['inference_images_per_cpu_s']:.2f} per CPU s)", flush=True)
    if python is not None:
        train, _, _ = load_split(splits.train, m.input_size)
        side = run_anomalib(python, base, checkpoint, train, test, workdir / f"anomalib-{name}", args.threads, device)
        with np.load(side["maps"]) as arrays:
            side.update(M.evaluate(labels, arrays["scores"], masks[:, 0].numpy(), arrays["maps"],
                                   base.eval.aupro_fpr_limit))
        side["s_per_epoch"] = statistics.median(side["epoch_seconds"])
        side["cpu_s_per_epoch"] = statistics.median(side["epoch_cpu_seconds"])
        out["anomalib"] = side
        print(f"   anomalib {side['anomalib']}: {side['s_per_epoch']:7.1f} s/epoch {fmt_list(side['epoch_seconds'])} "
              f"CPU {fmt_list(side['epoch_cpu_seconds'])}, "
              f"inference {side['inference_images_per_s']:.2f} images/s, peak RSS {side['peak_rss_mb']:.0f} MB, "
              f"AUROC img {fmt(side['image_auroc'])} px {fmt(side.get('pixel_auroc'))}", flush=True)
    for row in out["modes"].values():
        row.pop("checkpoint")
    return out


def bench_profile(args, view: Path, workdir: Path, presets: list[str]) -> dict:
    """Phases of one uncached ResNet18 epoch, top operators of a flow step, and the permutation what-if."""
    plan = dict(PRESETS["resnet18"].quick if args.quick else PRESETS["resnet18"].full)
    cfg = with_cache(preset_config("resnet18", plan, view, args.category, workdir / "cache" / "profile", args.device),
                     "off")
    device = resolve_device(cfg.train.device)
    phases, features, model = profile_flow.epoch_phases(cfg, device)
    small = [f[:16] for f in features]  # >= 16: the batch size from which CPU 1x1 convs take the oneDNN path
    ops, ops_total = profile_flow.top_ops(model, small)
    out = {"phases": phases, "train_images": plan["train_images"], "top_ops": ops,
           "top_ops_total_s": ops_total, "whatif": {"resnet18": profile_flow.permutation_whatif(model, small)}}
    if "deit" in presets:
        deit = preset_config("deit", PRESETS["deit"].full, view, args.category, workdir / "cache" / "profile",
                             args.device)
        deit_model = profile_flow.FastFlow(deit.model).to(device)
        out["whatif"]["deit"] = profile_flow.permutation_whatif(
            deit_model, profile_flow.random_features(deit_model, 4, device))
    return out


# ---------------------------------------------------------------- report


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_list(values) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"


def fmt_encode(seconds: dict) -> str:
    return " + ".join(f"{k} {v:.1f}s" for k, v in seconds.items()) or "none"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def pair(cpu: float | None, wall: float, digits: int = 1) -> str:
    """'CPU (wall)' seconds or rates."""
    return f"{wall:.{digits}f}" if cpu is None else f"{cpu:.{digits}f} ({wall:.{digits}f})"


def speed(base: dict, row: dict) -> str:
    """base/row seconds per epoch: 'CPU-time ratio (wall-clock ratio)'."""
    wall = base["s_per_epoch"] / row["s_per_epoch"]
    if base.get("cpu_s_per_epoch") is None or row.get("cpu_s_per_epoch") is None:
        return f"{wall:.2f}x"
    return f"{base['cpu_s_per_epoch'] / row['cpu_s_per_epoch']:.2f}x ({wall:.2f}x)"


def rss(peak: float, base: float, cuda: float | None = None) -> str:
    return f"{peak:.0f} (+{peak - base:.0f})" + (f", CUDA {cuda:.0f}" if cuda is not None else "")


def cache_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        off = r["modes"].get("off")
        for mode, row in r["modes"].items():
            rows.append([r["preset"], f"{r['train_images']}x{r['plan']['epochs']}", mode,
                         pair(row["cpu_s_per_epoch"], row["s_per_epoch"]), speed(off, row) if off else "n/a",
                         fmt_encode(row["encode_s"]), f"{row['wall_s']:.0f}",
                         rss(row["peak_rss_mb"], row["base_rss_mb"], row["cuda_peak_mb"]), fmt(row["image_auroc"]),
                         fmt(row["pixel_auroc"]), fmt(row["aupro"])])
    return table(["preset", "train imgs x epochs", "cache", "s/epoch CPU (wall)", "speed-up vs off CPU (wall)",
                  "one-time encode (wall)", "run wall s", "peak RSS MB (+in run)", "image AUROC", "pixel AUROC",
                  "AUPRO"], rows)


def compare_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        side = r.get("anomalib")
        if side is None:
            continue
        infer = pair(side.get("inference_images_per_cpu_s"), side["inference_images_per_s"], 2)
        rows.append([r["preset"], f"anomalib {side['anomalib']}",
                     pair(side.get("cpu_s_per_epoch"), side["s_per_epoch"]), "1.00x", infer, "1.00x",
                     rss(side["peak_rss_mb"], side["base_rss_mb"], side["cuda_peak_mb"]),
                     fmt(side["image_auroc"]), fmt(side.get("pixel_auroc")), fmt(side.get("aupro"))])
        ours_infer = pair(r["inference_images_per_cpu_s"], r["inference_images_per_s"], 2)
        infer_ratio = (f"{r['inference_images_per_cpu_s'] / side['inference_images_per_cpu_s']:.2f}x "
                       f"({r['inference_images_per_s'] / side['inference_images_per_s']:.2f}x)")
        for mode, row in r["modes"].items():
            rows.append([r["preset"], f"ours, cache {mode}", pair(row["cpu_s_per_epoch"], row["s_per_epoch"]),
                         speed(side, row), ours_infer, infer_ratio,
                         rss(row["peak_rss_mb"], row["base_rss_mb"], row["cuda_peak_mb"]), fmt(row["image_auroc"]),
                         fmt(row["pixel_auroc"]), fmt(row["aupro"])])
    return table(["preset", "implementation", "s/epoch CPU (wall)", "train speed vs anomalib CPU (wall)",
                  "inference img/s per CPU s (wall)", "inference vs anomalib", "peak RSS MB (+in run)",
                  "image AUROC", "pixel AUROC", "AUPRO"], rows)


def targets(results: list[dict]) -> list[str]:
    lines = []
    for preset, goal in (("deit", 5.0), ("resnet18", 1.1)):
        r = next((r for r in results if r["preset"] == preset and "anomalib" in r), None)
        cached = [m for m in ("memory", "disk") if r and m in r["modes"]]
        if not cached:
            continue
        side = r["anomalib"]
        key = "cpu_s_per_epoch" if all(r["modes"][m]["cpu_s_per_epoch"] for m in cached) else "s_per_epoch"
        best = max(side[key] / r["modes"][m][key] for m in cached)
        lines.append(f"- {preset}: with the cache {best:.2f}x anomalib's training speed per epoch "
                     f"({'CPU' if key.startswith('cpu') else 'wall'} time; target >= {goal}x): "
                     f"{'met' if best >= goal else 'NOT met'}")
    return lines


def profile_report(p: dict) -> str:
    total = sum(p["phases"].values())
    rows = [[name, f"{s:.1f}", f"{100 * s / total:.0f}%"] for name, s in p["phases"].items()]
    text = [f"One uncached ResNet18 epoch ({total:.1f} CPU s):", table(["phase", "s", "share"], rows), "",
            f"Top operators of one flow training step on cached features (batch 16, self wall time, "
            f"total {p['top_ops_total_s']:.2f} s):",
            table(["operator", "s", "share"], [[k, f"{s:.2f}", f"{100 * s / p['top_ops_total_s']:.0f}%"]
                                              for k, s in p["top_ops"]]), "",
            "What-if: FrEIA's hard channel permutation as channel indexing instead of a 1x1 conv with a CxC "
            "matrix (flow forward+backward, CPU s):"]
    rows = [[k, str(w["batch"]), f"{w['stock_s']:.2f}", f"{w['index_s']:.2f}", f"{w['speedup']:.2f}x",
             f"{w['max_abs_diff']:.1e}"] for k, w in p["whatif"].items()]
    text.append(table(["flow", "batch", "stock s", "indexed s", "speed-up", "max |diff| of z and log-det"], rows))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MVTec-layout root (default: %(default)s)")
    parser.add_argument("--category", default="tire")
    parser.add_argument("--presets", help=f"comma list of {', '.join(PRESETS)} (default: all; --quick: no deit)")
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs, no DeiT (~4 min)")
    parser.add_argument("--compare-anomalib", action="store_true",
                        help=f"also run anomalib 2.7.0's FastFlow from {ANOMALIB_VENV.relative_to(REPO)}")
    parser.add_argument("--anomalib-python", type=Path, help="python of an anomalib venv (default: create/use "
                        "benchmarks/.venv-anomalib)")
    parser.add_argument("--epochs", type=int, help="override every preset's epochs")
    parser.add_argument("--train-images", type=int, help="override every preset's train images (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="train.device for both sides (default: %(default)s)")
    parser.add_argument("--no-profile", action="store_true", help="skip the ResNet18 epoch profile")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc thresholds (page-fault cost then depends on process history)")
    parser.add_argument("--json", type=Path, help="also write all numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (view, caches, hand-off)")
    args = parser.parse_args(argv)
    presets = (args.presets or ("resnet18,efficientnet_lite0" if args.quick else ",".join(PRESETS))).split(",")
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset {unknown[0]!r}; known: {', '.join(PRESETS)}")
    torch.set_num_threads(args.threads)
    python = None
    if args.compare_anomalib:
        python = args.anomalib_python or ensure_anomalib_venv(ANOMALIB_VENV)
    workdir = Path(tempfile.mkdtemp(prefix="fastflow-bench-"))
    started = time.perf_counter()
    print(f"# FastFlow benchmark: {args.root / args.category}\n"
          f"torch {torch.__version__}, {args.threads} thread(s) each side, device {args.device}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average at start "
          f"{os.getloadavg()[0]:.1f}; malloc: {'glibc defaults' if args.system_malloc else MALLOC_ENV}", flush=True)
    try:
        results = []
        for name in presets:
            plan = dict(PRESETS[name].quick if args.quick else PRESETS[name].full)
            plan.update({k: v for k, v in (("epochs", args.epochs), ("train_images", args.train_images))
                         if v is not None})
            view = make_view(args.root, args.category, plan["test_images"], workdir / f"view-{name}")
            results.append(bench_preset(name, plan, args, view, workdir, python))
        profile = None
        if not args.no_profile and "resnet18" in presets:
            print("\n## profile", flush=True)
            view = workdir / "view-resnet18"
            profile = bench_profile(args, view, workdir, presets)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    minutes = (time.perf_counter() - started) / 60
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_minutes = (time.process_time() + children.ru_utime + children.ru_stime) / 60
    print(f"\n# Results ({minutes:.1f} min wall, {cpu_minutes:.1f} min CPU incl. start-up and child processes; "
          f"load average now {os.getloadavg()[0]:.1f})\n")
    print("Feature cache (s/epoch: median over epochs, CPU seconds of the process and, in brackets, wall seconds; "
          "encode: one-time backbone pass per split; run wall: train_and_evaluate total):\n")
    print(cache_table(results))
    print("\nFull-model inference (normalize + backbone + flows + map + score), images per CPU s (per wall s): "
          + ", ".join(f"{r['preset']} {pair(r['inference_images_per_cpu_s'], r['inference_images_per_s'], 2)}"
                      for r in results))
    if python is not None:
        print("\nAgainst anomalib (same tensors, backbone weights, flow settings, seed; anomalib trained with a "
              "plain loop on preloaded images):\n")
        print(compare_table(results))
        print("\n" + "\n".join(targets(results)))
    if profile is not None:
        print("\n" + profile_report(profile))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "profile": profile, "minutes": minutes,
                                         "cpu_minutes": cpu_minutes,
                                         "threads": args.threads, "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    if "--system-malloc" not in sys.argv and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        # glibc reads these at start-up only
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})
    sys.exit(main())
