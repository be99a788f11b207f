"""A servable model: rebuilt from its recorded recipe, weights read from safetensors — nothing unpickled."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainyard.errors import TrainyardError
from trainyard.ml.architectures import InputShape, build_architecture
from trainyard.ml.datasets import UnreadableImage, decode_image_bytes
from trainyard.ml.transforms import standardize

WEIGHTS_FILE, METADATA_FILE = "weights.safetensors", "trainyard.json"
MAX_PIXELS = 4096 * 4096  # larger uploads are refused from the header, before decoding


class ModelNotServable(TrainyardError):
    status = 409
    title = "Model version cannot be served"


@dataclass
class LoadedModel:
    name: str
    version: int
    task: str
    classes: list[str]
    image_shape: tuple[int, int, int]
    mean: torch.Tensor
    std: torch.Tensor
    module: nn.Module
    lock: threading.Lock


def load_model_files(folder: Path, name: str, version: int) -> LoadedModel:
    """Rebuild a model from `trainyard.json` and `weights.safetensors` in a downloaded model folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    recipe_path = next(folder.rglob(METADATA_FILE), None)
    weights_path = next(folder.rglob(WEIGHTS_FILE), None)
    if recipe_path is None or weights_path is None:
        raise ModelNotServable(f"{name} version {version} was not logged by Trainyard with safetensors weights "
                               "and a recipe; it is not loaded (loading other formats could run code).")
    try:
        recipe = json.loads(recipe_path.read_text())
        channels, height, width = recipe["image_shape"]
        module = build_architecture(recipe["architecture"],
                                    InputShape(channels, height, width, len(recipe["classes"])),
                                    recipe.get("architecture_options") or {})
        module.load_state_dict(load_file(str(weights_path), device="cpu"), strict=True)
        return LoadedModel(
            name=name, version=version, task=recipe["task"], classes=list(recipe["classes"]),
            image_shape=(channels, height, width), mean=torch.tensor(recipe["mean"]),
            std=torch.tensor(recipe["std"]), module=module.eval(), lock=threading.Lock(),
        )
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError, TrainyardError) as exc:
        raise ModelNotServable(f"{name} version {version} cannot be loaded safely: "
                               f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from None


def preprocess(model: LoadedModel, files: list[tuple[str, bytes]]) -> torch.Tensor:
    """Decode, convert, resize and normalise image files exactly as the training run did.

    Raises UnreadableImage("<file>: <reason>") naming the first file that is not a usable image.
    """
    channels, height, width = model.image_shape
    arrays = []
    for filename, data in files:
        try:
            arrays.append(decode_image_bytes(data, channels, (height, width), MAX_PIXELS))
        except UnreadableImage as exc:
            reason = str(exc)
            if "cannot identify image file" in reason:
                reason = "not an image format Pillow can read"
            error = UnreadableImage(f"{filename}: {reason}")
            error.file = filename
            raise error from None
    x = torch.from_numpy(np.stack(arrays)).float().div_(255.0)
    return standardize(x, model.mean, model.std)
