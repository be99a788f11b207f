"""`resnet18` … `resnet152`: He et al. (2015)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torchvision
from torch import nn

from trainyard.ml.architectures import InputShape, conv_like, is_small, register_architecture


def build_resnet(builder: Callable[..., nn.Module], shape: InputShape) -> nn.Module:
    model = builder(weights=None, num_classes=shape.num_classes)
    if is_small(shape):
        # CIFAR-style stem (He et al., §4.2): the 7×7/2 conv and max-pool would discard 3/4 of a small image twice.
        model.conv1 = conv_like(model.conv1, shape.channels, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    elif shape.channels != 3:
        model.conv1 = conv_like(model.conv1, shape.channels)
    return model


for _depth in (18, 34, 50, 101, 152):
    register_architecture(
        f"resnet{_depth}", task="classification", description=f"ResNet-{_depth} (He et al., 2015)"
    )(partial(build_resnet, getattr(torchvision.models, f"resnet{_depth}")))
