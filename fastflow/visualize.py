"""Pictures for humans: heatmap grids and training curves (no I/O; callers save or log them)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """`(3,H,W)` in [0,1] -> `(H,W,3)` uint8."""
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def colorize(maps: np.ndarray, low: float, high: float) -> np.ndarray:
    """`(...,H,W)` scores -> `(...,H,W,3)` uint8 through the jet colour map, scaled to [low, high]."""
    scaled = np.clip((maps - low) / max(high - low, 1e-12), 0, 1)
    return (plt.get_cmap("jet")(scaled)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image * (1 - alpha) + heat * alpha).astype(np.uint8)


def heatmap_grid(images: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
    """One row per image: input | ground-truth mask | heatmap overlay; `-> (k*S, 3*S, 3)` uint8.

    All heatmaps share one colour scale (min..max over the grid), so rows are comparable.
    """
    scores = maps[:, 0].float().numpy()
    heat = colorize(scores, float(scores.min()), float(scores.max()))
    rows = []
    for image, mask, heat_row in zip(images, masks, heat):
        rgb = _to_uint8(image)
        mask_rgb = np.repeat((mask[0].float().numpy() * 255).astype(np.uint8)[..., None], 3, axis=2)
        rows.append(np.concatenate([rgb, mask_rgb, overlay(rgb, heat_row)], axis=1))
    return np.concatenate(rows, axis=0)


def labelled_heatmap_grid(images: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor, scores, labels,
                          title: str = "", cell_inches: float = 2.2) -> np.ndarray:
    """`heatmap_grid` with words: column titles, each row's ground truth and image score, a title line.

    `scores (k,)` image scores, `labels (k,)` 1 defective / 0 good; `-> (H, W, 3)` uint8 (about 220 px per cell).
    """
    grid = heatmap_grid(images, masks, maps)
    rows, size = len(images), grid.shape[0] // max(len(images), 1)
    figure, axes = plt.subplots(rows, 3, figsize=(3 * cell_inches, rows * cell_inches + 0.5), squeeze=False)
    for row in range(rows):
        truth = "defective" if int(labels[row]) else "good"
        for column, name in enumerate(("input", "ground-truth mask", "anomaly map (shared scale)")):
            axis = axes[row, column]
            axis.imshow(grid[row * size:(row + 1) * size, column * size:(column + 1) * size])
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=10)
        axes[row, 0].set_ylabel(f"{truth}\nscore {float(scores[row]):.3g}", fontsize=10,
                                color="firebrick" if int(labels[row]) else "black")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return figure_to_array(figure)


def figure_to_array(figure: plt.Figure) -> np.ndarray:
    """Render and close a figure: `-> (H, W, 3)` uint8."""
    figure.canvas.draw()
    array = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return array


def curves_figure(history: list[dict[str, float]]) -> plt.Figure:
    """Loss (left) and AUROC/AUPRO per epoch (right)."""
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in history]
    loss_axis.plot(epochs, [row["train/loss"] for row in history], label="train loss")
    val = [(row["epoch"], row["eval/val_loss"]) for row in history if "eval/val_loss" in row]
    if val:
        loss_axis.plot(*zip(*val), label="validation loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_title("loss")
    loss_axis.legend()
    for key in ("eval/image_auroc", "eval/pixel_auroc", "eval/aupro", "eval/val_image_auroc"):
        points = [(row["epoch"], row[key]) for row in history if key in row]
        if points:
            metric_axis.plot(*zip(*points), marker="o", label=key.split("/")[1])
    metric_axis.set_xlabel("epoch")
    metric_axis.set_title("evaluation")
    metric_axis.set_ylim(0, 1.02)
    metric_axis.legend()
    figure.tight_layout()
    return figure
