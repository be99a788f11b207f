"""Batch transforms on tensors (so they run on the GPU when there is one): normalisation and augmentation.

Augmentation draws one affine transform per sample — flip, shift, rotation — and applies it with one
`grid_sample` to the images and, with nearest sampling, to segmentation masks, so both move together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainyard.registry import Registry


@dataclass(frozen=True)
class AugmentationPreset:
    flip: bool = False
    shift: float = 0.0  # largest shift, as a fraction of the image side
    rotate_degrees: float = 0.0
    color_jitter: float = 0.0  # largest relative change of brightness and contrast

    @property
    def is_identity(self) -> bool:
        return not (self.flip or self.shift or self.rotate_degrees or self.color_jitter)


AUGMENTATIONS: Registry[AugmentationPreset] = Registry("augmentation preset")
AUGMENTATIONS.register("none", description="no augmentation")(AugmentationPreset())
AUGMENTATIONS.register("light", description="horizontal flip and random shift (crop)")(
    AugmentationPreset(flip=True, shift=0.125)
)
AUGMENTATIONS.register("standard", description="light, plus rotation up to 15° and colour jitter")(
    AugmentationPreset(flip=True, shift=0.125, rotate_degrees=15.0, color_jitter=0.2)
)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) → float32 in 0..1."""
    return images.float().div_(255.0)


def standardize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-channel (x - mean) / std, the normalisation recorded with the model for serving."""
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def augment(
    preset: AugmentationPreset,
    images: torch.Tensor,
    masks: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly transform float images (N, C, H, W) in 0..1 and their masks (N, H, W) alike."""
    if preset.is_identity:
        return images, masks
    n, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * (high - low) + low).to(device)

    if preset.color_jitter:
        j = preset.color_jitter
        brightness = uniform(1 - j, 1 + j).view(n, 1, 1, 1)
        contrast = uniform(1 - j, 1 + j).view(n, 1, 1, 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * contrast + mean * brightness).clamp_(0, 1)

    angle = uniform(-preset.rotate_degrees, preset.rotate_degrees) * (math.pi / 180)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if preset.flip else torch.ones(n, device=device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output → input coordinates in [-1, 1]; a shift of 2·s is s of the image side.
    theta = torch.stack([
        torch.stack([cos * flip, -sin, uniform(-2 * preset.shift, 2 * preset.shift)], dim=1),
        torch.stack([sin * flip, cos, uniform(-2 * preset.shift, 2 * preset.shift)], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if masks is not None:
        warped = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="reflection",
                               align_corners=False)
        masks = warped[:, 0].round_().long()
    return images, masks
