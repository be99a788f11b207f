"""`alexnet`: Krizhevsky et al. (2012), torchvision's single-tower variant."""

from __future__ import annotations

import torchvision
from torch import nn

from trainyard.ml.architectures import InputShape, is_small, register_architecture


@register_architecture("alexnet", task="classification", description="AlexNet (Krizhevsky et al., 2012)")
def build_alexnet(shape: InputShape) -> nn.Module:
    model = torchvision.models.alexnet(weights=None, num_classes=shape.num_classes)
    if is_small(shape):
        # An 11×11/4 conv and three 3/2 pools reduce a 32-px image to nothing; keep the resolution instead.
        model.features[0] = nn.Conv2d(shape.channels, 64, kernel_size=3, stride=1, padding=1)
        for i, layer in enumerate(model.features):
            if isinstance(layer, nn.MaxPool2d):
                model.features[i] = nn.MaxPool2d(2, 2, ceil_mode=True)
    elif shape.channels != 3:
        model.features[0] = nn.Conv2d(shape.channels, 64, kernel_size=11, stride=4, padding=2)
    return model
