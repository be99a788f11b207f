"""Evaluation metrics for classification and segmentation, plus PNG renderings for the run's artifacts.

Both metric classes accumulate a confusion matrix on the logits' device and sync with the host only in
`compute()`, so calling `update()` every batch costs no GPU round trip.

Averaging convention (the one torchmetrics and scikit-learn use): a macro average runs over the classes
that occur in the targets *or* the predictions; a class absent from both is left out. A class with no
predictions has precision 0, a class with no support has recall 0, and F1 is 0 when precision and
recall are both 0. Per-class dictionaries omit classes that cannot be scored: `per_class_accuracy`
the classes without support, `per_class_iou` the classes absent from both targets and predictions.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ClassificationMetrics",
    "ClassificationResult",
    "SegmentationMetrics",
    "SegmentationResult",
    "confusion_matrix_png",
    "segmentation_overlay_png",
]


@dataclass
class ClassificationResult:
    """What one classification evaluation pass measured."""

    scalars: dict[str, float]
    per_class_accuracy: dict[str, float]
    confusion_matrix: list[list[int]]
    class_names: list[str]


@dataclass
class SegmentationResult:
    """What one segmentation evaluation pass measured."""

    scalars: dict[str, float]
    per_class_iou: dict[str, float]
    confusion_matrix: list[list[int]]
    class_names: list[str]


# ---- accumulation -----------------------------------------------------------------------------------


def _class_names(num_classes: int, class_names: list[str] | None) -> list[str]:
    """The given names checked against num_classes, or "0", "1", ... when none are given."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique (they key the per-class results)")
    return names


class _ConfusionAccumulator:
    """A C×C confusion matrix (rows true, columns predicted) and the summed loss."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        # Created on the first update, so the counts live on whatever device the logits are on.
        self.matrix: Tensor | None = None
        self.loss_sum: Tensor | None = None
        self.loss_samples = 0

    def _ensure(self, device: torch.device) -> None:
        if self.matrix is None:
            self.matrix = torch.zeros(self.num_classes * self.num_classes, dtype=torch.int64, device=device)
            self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, preds: Tensor, targets: Tensor, samples: int, loss_sum: float | Tensor | None,
            valid: Tensor | None = None) -> None:
        """Count (target, prediction) pairs, skipping those where `valid` is False."""
        self._ensure(targets.device)
        preds, targets = preds.reshape(-1).to(self.matrix.device), targets.reshape(-1).to(self.matrix.device)
        cells = targets * self.num_classes + preds
        ones = torch.ones_like(cells)
        if valid is not None:
            # Masking with weights instead of boolean indexing: indexing would wait for the GPU.
            valid = valid.reshape(-1).to(self.matrix.device)
            cells, ones = cells.where(valid, 0), valid.to(torch.int64)
        # index_add_ rather than bincount: CUDA bincount reads the maximum back to the host.
        self.matrix.index_add_(0, cells, ones)
        if loss_sum is not None:
            if isinstance(loss_sum, Tensor):  # stays a tensor: float() here would wait for the GPU
                loss_sum = loss_sum.detach().sum().to(self.loss_sum.device, torch.float64)
            self.loss_sum += loss_sum
            self.loss_samples += samples

    def confusion(self) -> Tensor:
        """The matrix on the CPU as a C×C int64 tensor."""
        if self.matrix is None:
            raise ValueError("compute() called before any update()")
        return self.matrix.reshape(self.num_classes, self.num_classes).cpu()

    def mean_loss(self) -> float | None:
        """Mean loss per sample over the updates that passed one, or None if none did."""
        return float(self.loss_sum) / self.loss_samples if self.loss_samples else None


def _check_labels(targets: Tensor, shape: tuple[int, ...], what: str) -> None:
    if targets.shape != shape:
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"{what} must be an integer tensor, got {targets.dtype}")


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den element-wise in float64, with 0 where den is 0."""
    num, den = num.to(torch.float64), den.to(torch.float64)
    return torch.where(den > 0, num / den.where(den > 0, 1.0), torch.zeros_like(num))


# ---- classification ---------------------------------------------------------------------------------


class ClassificationMetrics:
    """Accuracy, top-5 accuracy, macro precision/recall/F1 and the confusion matrix over batches."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None) -> None:
        self.class_names = _class_names(num_classes, class_names)
        self.num_classes = num_classes
        self._counts = _ConfusionAccumulator(num_classes)
        self._top5_correct: Tensor | None = None

    def reset(self) -> None:
        self._counts.reset()
        self._top5_correct = None

    def update(self, logits: Tensor, targets: Tensor, loss_sum: float | Tensor | None = None) -> None:
        """Add a batch: logits (N, C), integer targets (N,), and the batch's summed (not mean) loss."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (N, {self.num_classes}), got {tuple(logits.shape)}")
        _check_labels(targets, logits.shape[:1], "targets")
        logits = logits.detach()
        targets = targets.to(logits.device, torch.int64)
        self._counts.add(logits.argmax(1), targets, len(targets), loss_sum)
        if self.num_classes > 5:
            top5 = logits.topk(5, dim=1).indices
            hits = (top5 == targets[:, None]).any(1).sum()
            self._top5_correct = hits if self._top5_correct is None else self._top5_correct + hits

    def compute(self) -> ClassificationResult:
        """The metrics over everything added since construction or the last reset()."""
        cm = self._counts.confusion()
        tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
        samples = int(support.sum())
        if samples == 0:
            raise ValueError("no samples were added")
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        f1 = _ratio(2 * precision * recall, precision + recall)
        scored = (support + predicted) > 0  # in the targets or the predictions

        scalars: dict[str, float] = {}
        loss = self._counts.mean_loss()
        if loss is not None:
            scalars["loss"] = loss
        scalars["accuracy"] = int(tp.sum()) / samples
        if self._top5_correct is not None:
            scalars["top5_accuracy"] = int(self._top5_correct) / samples
        scalars["precision_macro"] = float(precision[scored].mean())
        scalars["recall_macro"] = float(recall[scored].mean())
        scalars["f1_macro"] = float(f1[scored].mean())
        per_class = {name: float(recall[i]) for i, name in enumerate(self.class_names) if support[i] > 0}
        return ClassificationResult(scalars, per_class, cm.tolist(), list(self.class_names))


# ---- segmentation -----------------------------------------------------------------------------------


class SegmentationMetrics:
    """Pixel accuracy, mean IoU, Dice and the pixel confusion matrix over batches."""

    def __init__(self, num_classes: int, class_names: list[str] | None = None,
                 ignore_index: int | None = None) -> None:
        self.class_names = _class_names(num_classes, class_names)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._counts = _ConfusionAccumulator(num_classes)

    def reset(self) -> None:
        self._counts.reset()

    def update(self, logits: Tensor, masks: Tensor, loss_sum: float | Tensor | None = None) -> None:
        """Add a batch: logits (N, C, H, W), integer masks (N, H, W), and the batch's loss summed over images.

        `loss_sum` is the per-image loss summed over the batch (batch mean × N), so `loss` is per image.
        """
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (N, {self.num_classes}, H, W), got {tuple(logits.shape)}")
        n, _, h, w = logits.shape
        _check_labels(masks, (n, h, w), "masks")
        masks = masks.to(logits.device, torch.int64)
        valid = None if self.ignore_index is None else masks != self.ignore_index
        self._counts.add(logits.detach().argmax(1), masks, n, loss_sum, valid)

    def compute(self) -> SegmentationResult:
        """The metrics over all non-ignored pixels added since construction or the last reset()."""
        cm = self._counts.confusion()
        tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
        pixels = int(support.sum())
        if pixels == 0:
            raise ValueError("no (non-ignored) pixels were added")
        union = support + predicted - tp
        iou = _ratio(tp, union)
        dice = _ratio(2 * tp, support + predicted)
        scored = union > 0  # in the targets or the predictions
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            # Its target pixels are gone, so only its false positives would remain: an IoU of 0 that
            # says nothing. Predictions of it still count against the true class of those pixels.
            scored[self.ignore_index] = False
        if not scored.any():
            raise ValueError("no class left to score after ignore_index")

        scalars: dict[str, float] = {}
        loss = self._counts.mean_loss()
        if loss is not None:
            scalars["loss"] = loss
        scalars["pixel_accuracy"] = int(tp.sum()) / pixels
        scalars["mean_iou"] = float(iou[scored].mean())
        scalars["dice"] = float(dice[scored].mean())
        per_class = {name: float(iou[i]) for i, name in enumerate(self.class_names) if scored[i]}
        return SegmentationResult(scalars, per_class, cm.tolist(), list(self.class_names))


# The metric a task's models are judged by: the registry's primary metric is its test_ value.
PRIMARY_METRIC = {"classification": "accuracy", "segmentation": "mean_iou"}


def epoch_metric_names(task: str, num_classes: int) -> list[str]:
    """The metrics every training epoch of `task` records: train_loss, and val_<name> for each scalar its
    validation pass computes (found by computing them on one tiny batch, so the list cannot drift from the
    metrics themselves)."""
    if task == "classification":
        metrics: ClassificationMetrics | SegmentationMetrics = ClassificationMetrics(num_classes)
        metrics.update(torch.eye(num_classes)[:2], torch.arange(2) % num_classes, loss_sum=0.0)
    else:
        metrics = SegmentationMetrics(num_classes)
        metrics.update(torch.zeros(1, num_classes, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64), loss_sum=0.0)
    return ["train_loss", *(f"val_{name}" for name in metrics.compute().scalars)]


# ---- pictures ---------------------------------------------------------------------------------------


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def confusion_matrix_png(matrix: list[list[int]], class_names: list[str]) -> bytes:
    """Render a confusion matrix (rows true, columns predicted) as a PNG with row-normalised colours."""
    # Figure + the Agg canvas directly: no pyplot, so no global backend and no figure registry to leak.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    if counts.shape != (n, n) or n < 1:
        raise ValueError(f"matrix must be {n}×{n} to match the class names, got shape {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)

    side = min(max(4.0, 1.5 + 0.45 * n), 20.0)  # inches: grows with the classes, capped at 2000 px
    font = min(10.0, 0.4 * side * 72 / n)  # points: about half a cell, so 100 names still fit
    fig = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    labels = [_short(name) for name in class_names]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for (i, j), count in np.ndenumerate(counts):
            colour = "white" if fractions[i, j] > 0.5 else "black"  # stay legible on dark cells
            ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=min(font, 9.0))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# Hand-picked, mutually distinct colours for the first classes; later ones step round the hue circle.
_BASE_COLOURS = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
    (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128), (255, 255, 255), (128, 128, 128),
]
_ALPHA = 0.5
_PAD = 2  # pixels between tiles
_HEADER = 16  # pixels for the column titles
_MIN_TILE = 96  # small images (28×28) are enlarged to at least this many pixels a side


def _palette(num_classes: int) -> np.ndarray:
    """A fixed RGB colour per class (row 0, the background, is never drawn)."""
    colours = [(0, 0, 0)]
    for k in range(1, num_classes):
        if k <= len(_BASE_COLOURS):
            colours.append(_BASE_COLOURS[k - 1])
        else:
            hue = (k * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbours apart
            colours.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95)))
    return np.asarray(colours, dtype=np.float32)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 with 1, 3 or 4 channels as (H, W, 3) float32."""
    channels = image.shape[0]
    if channels == 1:
        image = np.repeat(image, 3, axis=0)
    elif channels in (3, 4):
        image = image[:3]
    else:
        raise ValueError(f"images must have 1, 3 or 4 channels, got {channels}")
    return image.transpose(1, 2, 0).astype(np.float32)


def _overlay(rgb: np.ndarray, mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Blend each class's colour over the image; class 0 and out-of-range labels stay uncoloured."""
    known = (mask > 0) & (mask < len(palette))
    labels = np.where(known, mask, 0)
    alpha = (known * _ALPHA)[..., None]
    return rgb * (1 - alpha) + palette[labels] * alpha


def segmentation_overlay_png(images: Tensor, true_masks: Tensor, pred_masks: Tensor, num_classes: int,
                             max_images: int = 8) -> bytes:
    """A PNG grid, one row per image: input | ground truth overlaid | prediction overlaid."""
    from PIL import Image, ImageDraw

    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    n, _, h, w = images.shape
    for name, masks in (("true_masks", true_masks), ("pred_masks", pred_masks)):
        _check_labels(masks, (n, h, w), name)
    if n == 0 or max_images < 1:
        raise ValueError("need at least one image to draw")
    rows = min(n, max_images)
    inputs, truths, preds = (t[:rows].detach().cpu().numpy() for t in (images, true_masks, pred_masks))
    palette = _palette(num_classes)

    scale = max(1, math.ceil(_MIN_TILE / min(h, w)))
    tile_w, tile_h = w * scale, h * scale
    sheet = Image.new("RGB", (3 * tile_w + 4 * _PAD, _HEADER + rows * tile_h + (rows + 1) * _PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(("input", "ground truth", "prediction")):
        draw.text((_PAD + col * (tile_w + _PAD) + 2, 2), title, fill="black")
    for row in range(rows):
        rgb = _to_rgb(inputs[row])
        tiles = (rgb, _overlay(rgb, truths[row], palette), _overlay(rgb, preds[row], palette))
        top = _HEADER + _PAD + row * (tile_h + _PAD)
        for col, tile in enumerate(tiles):
            picture = Image.fromarray(np.clip(tile + 0.5, 0, 255).astype(np.uint8))
            picture = picture.resize((tile_w, tile_h), Image.Resampling.NEAREST)  # keep label edges crisp
            sheet.paste(picture, (_PAD + col * (tile_w + _PAD), top))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png_in_colour(mask_png: bytes, num_classes: int) -> bytes:
    """A PNG of class indices (what the prediction endpoint returns) with one colour per class."""
    from PIL import Image

    mask = np.asarray(Image.open(io.BytesIO(mask_png)))
    palette = _palette(max(num_classes, int(mask.max()) + 1)).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(palette[mask]).save(out, "PNG")
    return out.getvalue()
