"""`fcn_resnet50`, `deeplabv3_resnet50`: torchvision's semantic segmentation nets, returning plain logits."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

from trainyard.ml.architectures import InputShape, conv_like, register_architecture


class SegmentationLogits(nn.Module):
    """A torchvision segmentation model whose forward returns its `out` logits (N, classes, H, W), not a dict.

    It holds the model's `backbone` and `classifier` directly, so state-dict names match torchvision checkpoints.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.classifier = model.classifier

    def forward(self, x: Tensor) -> Tensor:
        # As torchvision's _SimpleSegmentationModel without the aux head: logits upsampled to the input size.
        logits = self.classifier(self.backbone(x)["out"])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_segmentation(builder: Callable[..., nn.Module], shape: InputShape) -> nn.Module:
    model = builder(weights=None, weights_backbone=None, aux_loss=False, num_classes=shape.num_classes)
    if shape.channels != 3:
        model.backbone.conv1 = conv_like(model.backbone.conv1, shape.channels)
    return SegmentationLogits(model)


for _name, _description in (
    ("fcn_resnet50", "Fully convolutional network on ResNet-50 (Long et al., 2015)"),
    ("deeplabv3_resnet50", "DeepLabv3 on ResNet-50 (Chen et al., 2017)"),
):
    register_architecture(_name, task="segmentation", description=_description)(
        partial(build_segmentation, getattr(torchvision.models.segmentation, _name))
    )
