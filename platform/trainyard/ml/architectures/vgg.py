"""`vgg11` … `vgg19_bn`: Simonyan & Zisserman (2014), with and without batch norm."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torchvision
from torch import nn

from trainyard.ml.architectures import InputShape, conv_like, is_small, register_architecture


def build_vgg(builder: Callable[..., nn.Module], shape: InputShape) -> nn.Module:
    model = builder(weights=None, num_classes=shape.num_classes)
    if shape.channels != 3:
        model.features[0] = conv_like(model.features[0], shape.channels)
    if is_small(shape):
        # Five floor-mode 2×2 pools take 28 px to 0; ceil mode stops at 1×1 and the adaptive pool does the rest.
        for layer in model.features:
            if isinstance(layer, nn.MaxPool2d):
                layer.ceil_mode = True
    return model


for _depth in (11, 13, 16, 19):
    for _suffix, _note in (("", ""), ("_bn", " with batch norm")):
        _name = f"vgg{_depth}{_suffix}"
        register_architecture(
            _name, task="classification", description=f"VGG-{_depth}{_note} (Simonyan & Zisserman, 2014)"
        )(partial(build_vgg, getattr(torchvision.models, _name)))
