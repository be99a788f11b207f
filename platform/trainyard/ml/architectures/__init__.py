"""Image architectures, registered by name (one module per family, as in timm's registry).

A builder takes the dataset's input shape and the architecture's validated options and returns a module:
classification nets map (N, C, H, W) → logits (N, classes); segmentation nets → logits (N, classes, H, W).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from trainyard.errors import InvalidSpec
from trainyard.registry import Registry


@dataclass(frozen=True)
class InputShape:
    channels: int
    height: int
    width: int
    num_classes: int


@dataclass(frozen=True)
class Architecture:
    name: str
    task: str  # "classification" or "segmentation"
    build: Callable[..., nn.Module]  # build(shape: InputShape, **options) -> nn.Module
    options: type[BaseModel] | None = None  # the architecture's own knobs (e.g. UNet depth), validated
    description: str = ""
    size_multiple: int = 1  # input height and width must be multiples of this (UNet: 2**depth)


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def register_architecture(
    name: str, *, task: str, description: str = "", options: type[BaseModel] | None = None,
    size_multiple: int = 1,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def add(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES.register(name, description=description, task=task)(
            Architecture(name, task, build, options, description, size_multiple)
        )
        return build

    return add


def validate_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The architecture's options with defaults filled in; InvalidSpec naming the bad field otherwise."""
    arch = ARCHITECTURES.get(name).obj
    options = options or {}
    if arch.options is None:
        if options:
            raise InvalidSpec(f"Architecture {name!r} takes no options (got {', '.join(options)}).")
        return {}
    try:
        return arch.options.model_validate(options).model_dump()
    except ValidationError as exc:
        errors = [{"field": "architecture_options." + ".".join(map(str, e["loc"])), "message": e["msg"]}
                  for e in exc.errors()]
        raise InvalidSpec("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors) from None


def build_architecture(name: str, shape: InputShape, options: dict[str, Any] | None = None) -> nn.Module:
    """Build the registered architecture `name` for inputs of `shape`."""
    return ARCHITECTURES.get(name).obj.build(shape, **validate_options(name, options))


# Below this side (in pixels) the ImageNet stems and pools would shrink the image to nothing, so the
# families switch to CIFAR-style stems; 224-px inputs keep the published ImageNet configuration.
SMALL_SIDE = 64


def is_small(shape: InputShape) -> bool:
    return min(shape.height, shape.width) < SMALL_SIDE


def conv_like(conv: nn.Conv2d, in_channels: int, **changes: Any) -> nn.Conv2d:
    """A conv like `conv` taking `in_channels` inputs (`changes` override kernel_size, stride, padding, bias).

    Initialised as torchvision initialises VGG and ResNet convs (Kaiming, fan-out), so a replaced stem trains alike.
    """
    kwargs = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, bias=conv.bias is not None)
    new = nn.Conv2d(in_channels, conv.out_channels, **(kwargs | changes))
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    """The file's tensors by name; never unpickles anything but tensors and plain containers."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # imported here: only weight files need it

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests switching weights-only loading off, which would run the file's code.
        raise InvalidSpec(
            f"Weights file {path.name!r} is not a weights-only torch file: it holds objects other than tensors, "
            "which could run code when loaded, so it was refused. Save torch.save(model.state_dict(), path) "
            "or a .safetensors file."
        ) from None
    except Exception as exc:  # safetensors, zip and I/O errors have no common base; all mean "unreadable"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidSpec(f"Cannot read weights file {path.name!r}: {reason}") from None
    for key in ("state_dict", "model"):  # checkpoints often wrap the state dict
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise InvalidSpec(f"Weights file {path.name!r} holds a {type(state).__name__}, not a state dict.")
    return state


def load_pretrained_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load every tensor of the file whose name and shape match `model`; return the names skipped.

    Mismatched tensors (e.g. a head for another number of classes) are skipped, so fine-tuning keeps a fresh head.
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    matched = {
        name: value for name, value in state.items()
        if isinstance(value, torch.Tensor) and name in own and own[name].shape == value.shape
    }
    if not matched:
        raise InvalidSpec(
            f"Weights file {path.name!r} has no tensor whose name and shape match the model "
            f"({len(state)} entries, e.g. {', '.join(list(map(str, state))[:3]) or 'none'})."
        )
    model.load_state_dict(matched, strict=False)
    return sorted(str(name) for name in state if name not in matched)


# Importing the family modules fills the registry, in this order (the API lists it so; `cnn` comes first).
from trainyard.ml.architectures import cnn  # noqa: E402,F401
from trainyard.ml.architectures import alexnet, vgg, resnet, unet, segmentation  # noqa: E402,F401,I001
