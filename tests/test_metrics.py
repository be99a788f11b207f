"""Evaluation metrics and their PNGs, checked against examples worked out by hand."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trainyard.ml.metrics as metrics_module
from trainyard.ml.metrics import (
    _HEADER,
    _PAD,
    ClassificationMetrics,
    SegmentationMetrics,
    _palette,
    confusion_matrix_png,
    segmentation_overlay_png,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def approx(value: F) -> object:
    return pytest.approx(float(value), abs=1e-12)


# ---- classification: 3 classes, 8 samples -----------------------------------------------------------

# sample  true  pred      confusion matrix (rows true, columns predicted):
#   0      0     0              pred 0  1  2
#   1      0     0        true 0     [2, 1, 0]
#   2      0     1        true 1     [0, 2, 1]
#   3      1     1        true 2     [0, 1, 1]
#   4      1     1
#   5      1     2        predicted per class (column sums): 2, 4, 2; support (row sums): 3, 3, 2
#   6      2     2
#   7      2     1
LOGITS_3 = torch.tensor([
    [2.0, 0.5, -1.0],   # -> 0
    [0.9, 0.1, 0.3],    # -> 0
    [0.2, 1.5, 1.0],    # -> 1
    [-1.0, 3.0, 0.0],   # -> 1
    [0.0, 0.4, 0.3],    # -> 1
    [0.1, 0.2, 0.7],    # -> 2
    [-2.0, -1.0, 0.5],  # -> 2
    [0.3, 2.2, 2.1],    # -> 1
])
TARGETS_3 = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
CONFUSION_3 = [[2, 1, 0], [0, 2, 1], [0, 1, 1]]
# precision = tp / predicted: 2/2, 2/4, 1/2          -> macro (1 + 1/2 + 1/2) / 3 = 2/3
# recall    = tp / support:   2/3, 2/3, 1/2          -> macro (2/3 + 2/3 + 1/2) / 3 = 11/18
# F1 = 2PR / (P + R):         4/5, 4/7, 1/2          -> macro (4/5 + 4/7 + 1/2) / 3 = 131/210
# accuracy = (2 + 2 + 1) / 8 = 5/8


def test_classification_hand_example():
    metrics = ClassificationMetrics(3, ["cat", "dog", "bird"])
    metrics.update(LOGITS_3, TARGETS_3, loss_sum=4.0)
    result = metrics.compute()

    assert result.confusion_matrix == CONFUSION_3
    assert result.class_names == ["cat", "dog", "bird"]
    assert result.scalars == {
        "loss": approx(F(4, 8)),
        "accuracy": approx(F(5, 8)),
        "precision_macro": approx(F(2, 3)),
        "recall_macro": approx(F(11, 18)),
        "f1_macro": approx(F(131, 210)),
    }
    assert "top5_accuracy" not in result.scalars  # 3 classes: every sample is in the top 5
    assert result.per_class_accuracy == {"cat": approx(F(2, 3)), "dog": approx(F(2, 3)), "bird": approx(F(1, 2))}


def test_classes_without_predictions_or_support():
    # 5 classes a..e.   sample  true  pred       confusion matrix   pred a  b  c  d  e
    #                     0      a     a                   true a     [1, 0, 1, 0, 0]
    #                     1      a     c                   true b     [0, 2, 0, 0, 0]
    #                     2      b     b                   true c     [0, 0, 0, 0, 0]
    #                     3      b     b                   true d     [0, 1, 0, 0, 0]
    #                     4      d     b                   true e     [0, 0, 0, 0, 0]
    # a: P 1/1, R 1/2, F1 2/3     b: P 2/3, R 2/2, F1 4/5
    # c: predicted but no support -> P 0, R 0, F1 0, still in the macro average
    # d: support but no predictions -> P 0, R 0, F1 0
    # e: in neither targets nor predictions -> left out of the macro average
    # macro over a, b, c, d: P (1 + 2/3) / 4 = 5/12, R (1/2 + 1) / 4 = 3/8, F1 (2/3 + 4/5) / 4 = 11/30
    preds = torch.tensor([0, 2, 1, 1, 1])
    metrics = ClassificationMetrics(5, list("abcde"))
    metrics.update(torch.nn.functional.one_hot(preds, 5).float(), torch.tensor([0, 0, 1, 1, 3]))
    result = metrics.compute()

    assert result.confusion_matrix == [
        [1, 0, 1, 0, 0], [0, 2, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0],
    ]
    assert result.scalars == {
        "accuracy": approx(F(3, 5)),
        "precision_macro": approx(F(5, 12)),
        "recall_macro": approx(F(3, 8)),
        "f1_macro": approx(F(11, 30)),
    }
    # c and e have no support, so no recall to report.
    assert result.per_class_accuracy == {"a": 0.5, "b": 1.0, "d": 0.0}


def test_top5_accuracy_with_7_classes():
    logits = torch.tensor([
        [7.0, 6, 5, 4, 3, 2, 1],     # true 4: 5th largest -> top-5 hit; top-1 is 0
        [7.0, 6, 5, 4, 3, 2, 1],     # true 5: 6th largest -> miss
        [1.0, 2, 3, 4, 5, 6, 7],     # true 6: largest -> top-1 and top-5 hit
        [0.0, 0.5, 3, 1, 2, 9, 8],   # true 1: order 5, 6, 2, 4, 3, 1, 0 -> 6th -> miss
    ])
    metrics = ClassificationMetrics(7)
    metrics.update(logits, torch.tensor([4, 5, 6, 1]))
    scalars = metrics.compute().scalars
    assert scalars["top5_accuracy"] == approx(F(2, 4))
    assert scalars["accuracy"] == approx(F(1, 4))


def test_classification_matches_scikit_learn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=generator)
    targets = torch.randint(0, 8, (500,), generator=generator)  # classes 8 and 9 have no support
    metrics = ClassificationMetrics(10)
    metrics.update(logits, targets)
    scalars = metrics.compute().scalars

    preds = logits.argmax(1).numpy()
    p, r, f, _ = precision_recall_fscore_support(targets.numpy(), preds, average="macro", zero_division=0)
    assert scalars["accuracy"] == pytest.approx(accuracy_score(targets.numpy(), preds))
    assert (scalars["precision_macro"], scalars["recall_macro"], scalars["f1_macro"]) == pytest.approx((p, r, f))


def test_accumulating_batches_equals_one_update_and_reset_starts_over():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(90, 8, generator=generator)
    targets = torch.randint(0, 8, (90,), generator=generator)
    losses = torch.rand(90, generator=generator)

    whole = ClassificationMetrics(8)
    whole.update(logits, targets, loss_sum=losses.sum())
    batched = ClassificationMetrics(8)
    batched.update(torch.randn(5, 8), torch.zeros(5, dtype=torch.int64), loss_sum=100.0)
    batched.reset()
    for part in (slice(0, 7), slice(7, 40), slice(40, 90)):
        # A float and a tensor loss_sum both accumulate.
        loss = losses[part].sum() if part.start else float(losses[part].sum())
        batched.update(logits[part], targets[part], loss_sum=loss)

    expected, got = whole.compute(), batched.compute()
    assert got.confusion_matrix == expected.confusion_matrix
    assert got.per_class_accuracy == expected.per_class_accuracy
    assert got.scalars == pytest.approx(expected.scalars)
    assert got.scalars["loss"] == pytest.approx(float(losses.mean()))

    batched.reset()
    with pytest.raises(ValueError, match="before any update"):
        batched.compute()


def test_loss_is_averaged_over_the_updates_that_had_one():
    metrics = ClassificationMetrics(3)
    metrics.update(LOGITS_3[:4], TARGETS_3[:4], loss_sum=torch.tensor(2.0))
    metrics.update(LOGITS_3[4:], TARGETS_3[4:])
    assert metrics.compute().scalars["loss"] == approx(F(2, 4))


def test_classification_rejects_bad_inputs():
    with pytest.raises(ValueError, match="class names"):
        ClassificationMetrics(3, ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        ClassificationMetrics(2, ["a", "a"])
    metrics = ClassificationMetrics(3)
    with pytest.raises(ValueError, match="shape"):
        metrics.update(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        metrics.update(torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        metrics.update(torch.zeros(4, 3), torch.zeros(4))


# ---- segmentation: 4×4 masks ------------------------------------------------------------------------

# true mask     predicted     confusion matrix (pixels)     support (rows): 4, 6, 6, 0
# 0 0 1 1       0 0 0 1             pred 0  1  2  3        predicted (cols): 5, 6, 5, 0
# 0 0 1 1       0 1 1 1       true 0    [3, 1, 0, 0]
# 2 2 1 1       2 2 1 1       true 1    [1, 5, 0, 0]
# 2 2 2 2       0 2 2 2       true 2    [1, 0, 5, 0]
#                             true 3    [0, 0, 0, 0]      class 3 is absent: not scored
# pixel accuracy (3 + 5 + 5) / 16 = 13/16
# IoU  = tp / (support + predicted - tp): 3/6, 5/7, 5/6      -> mean (1/2 + 5/7 + 5/6) / 3 = 43/63
# Dice = 2tp / (support + predicted):     6/9, 10/12, 10/11  -> mean (2/3 + 5/6 + 10/11) / 3 = 53/66
TRUE_MASK = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 2, 2]])
PRED_MASK = torch.tensor([[0, 0, 0, 1], [0, 1, 1, 1], [2, 2, 1, 1], [0, 2, 2, 2]])


def seg_logits(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) labels as (N, C, H, W) logits whose argmax is the label."""
    return torch.nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float()


def test_segmentation_hand_example():
    metrics = SegmentationMetrics(4, ["sky", "road", "car", "boat"])
    metrics.update(seg_logits(PRED_MASK[None], 4), TRUE_MASK[None], loss_sum=0.75)
    result = metrics.compute()

    assert result.confusion_matrix == [[3, 1, 0, 0], [1, 5, 0, 0], [1, 0, 5, 0], [0, 0, 0, 0]]
    assert result.scalars == {
        "loss": 0.75,
        "pixel_accuracy": approx(F(13, 16)),
        "mean_iou": approx(F(43, 63)),
        "dice": approx(F(53, 66)),
    }
    assert result.per_class_iou == {"sky": approx(F(1, 2)), "road": approx(F(5, 7)), "car": approx(F(5, 6))}


def test_segmentation_ignore_index_outside_the_classes():
    # Pixels (0, 2) (true 1, pred 0) and (3, 0) (true 2, pred 0) become 255 and drop out:
    # confusion [[3, 1, 0], [0, 5, 0], [0, 0, 5]]; support 4, 5, 5; predicted 3, 6, 5
    # pixel accuracy 13/14; IoU 3/4, 5/6, 5/5 -> 31/36; Dice 6/7, 10/11, 10/10 -> 71/77
    target = TRUE_MASK.clone()
    target[0, 2] = target[3, 0] = 255
    metrics = SegmentationMetrics(3, ignore_index=255)
    metrics.update(seg_logits(PRED_MASK[None], 3), target[None])
    result = metrics.compute()

    assert result.confusion_matrix == [[3, 1, 0], [0, 5, 0], [0, 0, 5]]
    assert result.scalars == {
        "pixel_accuracy": approx(F(13, 14)),
        "mean_iou": approx(F(31, 36)),
        "dice": approx(F(71, 77)),
    }


def test_segmentation_ignore_index_that_is_a_class():
    # ignore_index=0 drops the four true-0 pixels; class 0 is then not scored, but the two pixels
    # predicted 0 still count against classes 1 and 2: confusion [[0, 0, 0], [1, 5, 0], [1, 0, 5]]
    # pixel accuracy 10/12; IoU 5/6, 5/6; Dice 10/11, 10/11
    metrics = SegmentationMetrics(3, ignore_index=0)
    metrics.update(seg_logits(PRED_MASK[None], 3), TRUE_MASK[None])
    result = metrics.compute()

    assert result.confusion_matrix == [[0, 0, 0], [1, 5, 0], [1, 0, 5]]
    assert result.scalars == {
        "pixel_accuracy": approx(F(10, 12)),
        "mean_iou": approx(F(5, 6)),
        "dice": approx(F(10, 11)),
    }
    assert result.per_class_iou == {"1": approx(F(5, 6)), "2": approx(F(5, 6))}


def test_segmentation_accumulates_and_resets():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 3, 5, 7, generator=generator)
    masks = torch.randint(0, 4, (6, 5, 7), generator=generator)  # 3 stands in for "ignore"
    whole = SegmentationMetrics(3, ignore_index=3)
    whole.update(logits, masks, loss_sum=6.0)
    batched = SegmentationMetrics(3, ignore_index=3)
    batched.update(logits[:1], masks[:1], loss_sum=1.0)
    batched.update(logits[1:], masks[1:], loss_sum=torch.tensor(5.0))

    expected, got = whole.compute(), batched.compute()
    assert got == expected
    assert got.scalars["loss"] == 1.0  # 6.0 summed over 6 images
    assert sum(map(sum, got.confusion_matrix)) == int((masks != 3).sum())

    batched.reset()
    batched.update(logits[:2], masks[:2])
    fresh = SegmentationMetrics(3, ignore_index=3)
    fresh.update(logits[:2], masks[:2])
    assert batched.compute() == fresh.compute()


@pytest.mark.parametrize("device", DEVICES)
def test_state_stays_on_the_logits_device(device):
    classification = ClassificationMetrics(7)
    classification.update(torch.randn(16, 7, device=device), torch.randint(0, 7, (16,), device=device),
                          loss_sum=torch.tensor(3.0, device=device))
    assert classification._counts.matrix.device.type == device
    assert classification._top5_correct.device.type == device
    segmentation = SegmentationMetrics(3, ignore_index=255)
    segmentation.update(torch.randn(2, 3, 8, 8, device=device), torch.randint(0, 3, (2, 8, 8), device=device))
    assert segmentation._counts.matrix.device.type == device
    assert 0 <= classification.compute().scalars["accuracy"] <= 1
    assert 0 <= segmentation.compute().scalars["mean_iou"] <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_update_does_not_sync_with_the_gpu():
    logits, targets = torch.randn(64, 10, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    seg_logits_, masks = torch.randn(2, 3, 8, 8, device="cuda"), torch.randint(0, 3, (2, 8, 8), device="cuda")
    classification, segmentation = ClassificationMetrics(10), SegmentationMetrics(3, ignore_index=0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            classification.update(logits, targets, loss_sum=logits.sum())
            segmentation.update(seg_logits_, masks, loss_sum=1.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- pictures ---------------------------------------------------------------------------------------


def decode(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


@pytest.mark.parametrize("num_classes", [2, 5, 20, 100])
def test_confusion_matrix_png(num_classes):
    generator = np.random.default_rng(num_classes)
    matrix = generator.integers(0, 50, (num_classes, num_classes)).tolist()
    matrix[0] = [0] * num_classes  # a class with no samples must not divide by zero
    # Non-ASCII (Latin, Greek, Cyrillic) names and one far too long for a tick label.
    names = ["café", "Ωmega", "Ünïcødé", "Жук", "a" * 80] + [f"class {i}" for i in range(5, num_classes)]
    image = decode(confusion_matrix_png(matrix, names[:num_classes]))
    assert 300 <= image.width <= 2500 and 300 <= image.height <= 2500
    assert len(image.convert("RGB").getcolors(1 << 20)) > 10  # drew something, not a blank canvas


def test_confusion_matrix_png_from_a_result():
    metrics = ClassificationMetrics(3, ["cat", "dog", "bird"])
    metrics.update(LOGITS_3, TARGETS_3)
    result = metrics.compute()
    assert decode(confusion_matrix_png(result.confusion_matrix, result.class_names)).format == "PNG"
    with pytest.raises(ValueError, match="match the class names"):
        confusion_matrix_png(result.confusion_matrix, ["cat", "dog"])


def test_overlay_grid_layout_and_colours():
    # 3 RGB 8×8 images of flat gray 100; truth: left half class 1; prediction: all class 2.
    images = torch.full((3, 3, 8, 8), 100, dtype=torch.uint8)
    truth = torch.zeros(3, 8, 8, dtype=torch.int64)
    truth[:, :, :4] = 1
    pred = torch.full((3, 8, 8), 2, dtype=torch.int64)
    image = decode(segmentation_overlay_png(images, truth, pred, num_classes=3, max_images=2)).convert("RGB")

    tile = 96  # 8×8 is enlarged 12× to reach the minimum tile size
    assert image.size == (3 * tile + 4 * _PAD, _HEADER + 2 * tile + 3 * _PAD)  # 2 rows (max_images), 3 columns
    palette = _palette(3)

    def pixel(row: int, col: int, x: int, y: int) -> np.ndarray:
        return np.array(image.getpixel((_PAD + col * (tile + _PAD) + x, _HEADER + _PAD + row * (tile + _PAD) + y)))

    blend = lambda k: np.round(100 * 0.5 + palette[k] * 0.5)  # noqa: E731
    for row in range(2):
        assert (pixel(row, 0, 10, 10) == 100).all()                      # input, untouched
        assert np.abs(pixel(row, 1, 10, 10) - blend(1)).max() <= 1     # truth, left half: class 1
        assert (pixel(row, 1, 90, 10) == 100).all()                      # truth, right half: background
        assert np.abs(pixel(row, 2, 90, 90) - blend(2)).max() <= 1     # prediction: class 2


def test_overlay_gray_inputs_and_fewer_images_than_max():
    images = torch.arange(2 * 32 * 48, dtype=torch.int64).reshape(2, 1, 32, 48).remainder(256).to(torch.uint8)
    masks = torch.zeros(2, 32, 48, dtype=torch.int64)
    masks[0, 0, 0] = 255  # an "ignore" label beyond the classes is left uncoloured
    image = decode(segmentation_overlay_png(images, masks, masks, num_classes=2)).convert("RGB")
    tile_w, tile_h = 48 * 3, 32 * 3  # enlarged 3× so the short side reaches 96
    assert image.size == (3 * tile_w + 4 * _PAD, _HEADER + 2 * tile_h + 3 * _PAD)
    for col in range(3):  # gray in, gray out: nothing is coloured
        r, g, b = image.getpixel((_PAD + col * (tile_w + _PAD) + 5, _HEADER + _PAD + 5))
        assert r == g == b


def test_palette_gives_every_class_its_own_colour():
    palette = _palette(60)
    assert len({tuple(colour) for colour in palette[1:]}) == 59
    assert (_palette(5) == palette[:5]).all()  # a class's colour does not depend on num_classes


def test_overlay_rejects_bad_inputs():
    masks = torch.zeros(1, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="uint8"):
        segmentation_overlay_png(torch.zeros(1, 3, 4, 4), masks, masks, 2)
    with pytest.raises(ValueError, match="channels"):
        segmentation_overlay_png(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), masks, masks, 2)
    with pytest.raises(ValueError, match="shape"):
        segmentation_overlay_png(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), masks[:, :2], masks, 2)


def test_import_has_no_side_effects():
    # Importing must neither pull in matplotlib nor pick a backend for the whole process.
    code = "import sys, trainyard.ml.metrics; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    env = {**os.environ, "PYTHONPATH": str(Path(metrics_module.__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
