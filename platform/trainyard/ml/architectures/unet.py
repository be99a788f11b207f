"""`unet`: Ronneberger et al. (2015), with padded convolutions so the output keeps the input's size."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn import functional as F

from trainyard.ml.architectures import InputShape, register_architecture


class UNetOptions(BaseModel):
    """UNet knobs. The real size multiple is 2**depth (the registry's 16 is the default depth's);
    other sizes still work, padded in the decoder."""

    model_config = ConfigDict(extra="forbid")

    depth: int = Field(4, ge=1, le=6, description="Number of 2× down-samplings")
    base_width: int = Field(64, ge=4, le=128, description="Channels of the first block; doubled at each level")


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3×3 conv + BatchNorm + ReLU; no conv bias since BatchNorm follows."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder–decoder with skip connections: max-pool down, 2×2 transposed conv up, concatenate, 1×1 head."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 4, base_width: int = 64) -> None:
        super().__init__()
        widths = [base_width * 2**level for level in range(depth + 1)]
        self.stem = double_conv(in_channels, widths[0])
        self.down = nn.ModuleList(double_conv(widths[i], widths[i + 1]) for i in range(depth))
        levels = list(reversed(range(depth)))  # the decoder climbs from the deepest level
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in levels)
        self.decode = nn.ModuleList(double_conv(2 * widths[i], widths[i]) for i in levels)
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        x = self.stem(x)
        for block in self.down:
            skips.append(x)
            x = block(F.max_pool2d(x, 2))
        for up, block, skip in zip(self.up, self.decode, reversed(skips)):
            x = up(x)
            # Only when a side is not a multiple of 2**depth (depth is an option, the registry's multiple is not):
            # pad the odd pixel back rather than fail on the concatenation.
            dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
            x = block(torch.cat([skip, x], dim=1))
        return self.head(x)


@register_architecture(
    "unet", task="segmentation", description="U-Net (Ronneberger et al., 2015)", options=UNetOptions,
    size_multiple=2 ** UNetOptions.model_fields["depth"].default,
)
def build_unet(shape: InputShape, depth: int, base_width: int) -> nn.Module:
    return UNet(shape.channels, shape.num_classes, depth=depth, base_width=base_width)
