"""`cnn`: the classic small two-convolution network."""

from __future__ import annotations

from torch import nn

from trainyard.ml.architectures import InputShape, register_architecture


class SmallCNN(nn.Module):
    """Two 3×3 convolutions, max-pool and two linear layers (the classic MNIST convnet).

    Adaptive pooling before the classifier makes it correct for any input of at least 2×2 pixels.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(2 * width * 16, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.25),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_architecture("cnn", task="classification", description="Small two-convolution network for small images")
def build_cnn(shape: InputShape) -> nn.Module:
    return SmallCNN(shape.channels, shape.num_classes)
