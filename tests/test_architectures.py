"""The architecture registry: every family's output shapes, published sizes, options and weight loading."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from trainyard.errors import InvalidSpec
from trainyard.ml.architectures import (
    ARCHITECTURES, InputShape, build_architecture, load_pretrained_weights, validate_options,
)

CLASSIFIERS = [a.name for a in ARCHITECTURES if a.meta["task"] == "classification"]
SEGMENTERS = [a.name for a in ARCHITECTURES if a.meta["task"] == "segmentation"]

# torchvision's published parameter counts at 3×224×224 with 1000 classes (`cnn` has no published count).
PUBLISHED = {
    "alexnet": 61_100_840,
    "vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg13": 133_047_848, "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544, "vgg16_bn": 138_365_992, "vgg19": 143_667_240, "vgg19_bn": 143_678_248,
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
}
IMAGENET = InputShape(3, 224, 224, 1000)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Other test runs share the 2 CPU cores; one thread is also faster for these small forwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def forward(model: torch.nn.Module, channels: int, height: int, width: int, batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(batch, channels, height, width))


def count(name: str, shape: InputShape) -> int:
    with torch.device("meta"):  # no memory and no init cost: only the shapes matter
        return sum(p.numel() for p in build_architecture(name, shape).parameters())


def test_every_architecture_declares_a_task():
    assert len(ARCHITECTURES.names()) == 18
    for arch in ARCHITECTURES:
        assert arch.meta["task"] in {"classification", "segmentation"} and arch.obj.task == arch.meta["task"]
        assert arch.description


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_output_shapes_on_small_images(name):
    grey = build_architecture(name, InputShape(1, 28, 28, 10))
    assert forward(grey, 1, 28, 28).shape == (2, 10)
    assert forward(grey, 1, 8, 8).shape == (2, 10)  # scikit-learn digits
    colour = build_architecture(name, InputShape(3, 32, 32, 7))
    assert forward(colour, 3, 32, 32).shape == (2, 7)


@pytest.mark.parametrize(("name", "channels"), [("alexnet", 3), ("resnet18", 1), ("vgg11_bn", 3)])
def test_classifier_output_shape_at_224_px(name, channels):
    model = build_architecture(name, InputShape(channels, 224, 224, 5))
    assert forward(model, channels, 224, 224, batch=1).shape == (1, 5)


def test_published_parameter_counts_cover_every_classifier():
    assert set(PUBLISHED) == set(CLASSIFIERS) - {"cnn"}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_count_at_imagenet_size(name):
    assert count(name, IMAGENET) == PUBLISHED[name]
    with torch.device("meta"):
        reference = getattr(torchvision.models, name)(weights=None)
        # The small-image changes must leave the 224-px configuration exactly torchvision's.
        assert str(build_architecture(name, IMAGENET)) == str(reference)


def test_small_image_stems():
    with torch.device("meta"):  # structure only: no init cost
        resnet = build_architecture("resnet18", InputShape(1, 28, 28, 10))
        assert (resnet.conv1.in_channels, resnet.conv1.kernel_size, resnet.conv1.stride) == (1, (3, 3), (1, 1))
        assert resnet.conv1.bias is None and isinstance(resnet.maxpool, torch.nn.Identity)
        large = build_architecture("resnet18", InputShape(1, 224, 224, 10))
        assert (large.conv1.in_channels, large.conv1.kernel_size, large.conv1.stride) == (1, (7, 7), (2, 2))
        vgg = build_architecture("vgg11", InputShape(1, 32, 32, 10))
        assert vgg.features[0].in_channels == 1
        assert all(m.ceil_mode for m in vgg.features if isinstance(m, torch.nn.MaxPool2d))
        alexnet = build_architecture("alexnet", InputShape(3, 32, 32, 10))
        assert alexnet.features[0].kernel_size == (3, 3)
        assert {(m.kernel_size, m.stride) for m in alexnet.features if isinstance(m, torch.nn.MaxPool2d)} == {(2, 2)}


@pytest.mark.parametrize("name", SEGMENTERS)
def test_segmentation_output_shapes(name):
    grey = build_architecture(name, InputShape(1, 32, 32, 4))
    out = forward(grey, 1, 32, 32)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 32, 32)
    colour = build_architecture(name, InputShape(3, 64, 64, 21))
    assert forward(colour, 3, 64, 48).shape == (2, 21, 64, 48)


def test_unet_options():
    assert validate_options("unet", None) == {"depth": 4, "base_width": 64}
    assert ARCHITECTURES.get("unet").obj.size_multiple == 16
    model = build_architecture("unet", InputShape(3, 16, 16, 2), {"depth": 2, "base_width": 8})
    assert len(model.down) == len(model.up) == 2
    assert model.stem[0].out_channels == 8 and model.down[-1][0].out_channels == 32
    assert forward(model, 3, 20, 12).shape == (2, 2, 20, 12)  # multiples of 2**2, not of 16
    deep = build_architecture("unet", InputShape(1, 48, 48, 3), {"depth": 5, "base_width": 4})
    assert forward(deep, 1, 48, 40).shape == (2, 3, 48, 40)  # not multiples of 2**5: padded, not failed


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("unet", {"depth": 0}, "architecture_options.depth"),
        ("unet", {"depth": 7}, "architecture_options.depth"),
        ("unet", {"base_width": 2}, "architecture_options.base_width"),
        ("unet", {"base_width": 256}, "architecture_options.base_width"),
        ("unet", {"width": 32}, "architecture_options.width"),
        ("unet", {"depth": "deep"}, "architecture_options.depth"),
    ],
)
def test_validate_options_refuses_bad_unet_options(name, options, field):
    with pytest.raises(InvalidSpec) as exc:
        validate_options(name, options)
    assert [e["field"] for e in exc.value.errors] == [field]


def test_architectures_without_options_refuse_any():
    with pytest.raises(InvalidSpec, match="takes no options"):
        validate_options("resnet18", {"depth": 3})


# ---- pretrained weights ------------------------------------------------------------------------------


SMALL = InputShape(1, 28, 28, 10)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_load_pretrained_weights_skips_the_head_for_other_classes(tmp_path, wrap):
    source = build_architecture("resnet18", SMALL)
    path = tmp_path / "resnet18.pt"
    state = source.state_dict()
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    target = build_architecture("resnet18", InputShape(1, 28, 28, 5))
    fresh_head = target.fc.weight.clone()
    assert load_pretrained_weights(target, str(path)) == ["fc.bias", "fc.weight"]
    for name, value in target.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(value, state[name]), name
    assert torch.equal(target.fc.weight, fresh_head)


def test_load_pretrained_weights_from_safetensors(tmp_path):
    source = build_architecture("unet", InputShape(3, 32, 32, 2), {"depth": 2, "base_width": 8})
    path = tmp_path / "unet.safetensors"
    save_file(source.state_dict(), str(path))
    target = build_architecture("unet", InputShape(3, 32, 32, 2), {"depth": 2, "base_width": 8})
    assert load_pretrained_weights(target, path) == []
    for name, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name


class MakesMarker:
    """Unpickling this creates the marker file: the payload a weights loader must never run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_the_malicious_payload_is_live(tmp_path):
    # Proves the next test could fail: an ordinary unpickle does create the marker.
    pickle.loads(pickle.dumps(MakesMarker(tmp_path / "marker")))
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize(
    "save",
    [
        lambda obj, path: torch.save(obj, path),
        lambda obj, path: torch.save({"state_dict": {"fc.weight": obj}}, path),
        lambda obj, path: path.write_bytes(pickle.dumps(obj)),
    ],
    ids=["torch.save", "inside-state-dict", "pickle.dump"],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_pretrained_weights_refuses_a_malicious_pickle(tmp_path, save):
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    save(MakesMarker(marker), path)
    with pytest.raises(InvalidSpec, match="not a weights-only torch file"):
        load_pretrained_weights(build_architecture("cnn", SMALL), path)
    assert not marker.exists()


def test_load_pretrained_weights_refuses_unusable_files(tmp_path):
    model = build_architecture("cnn", SMALL)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00 not safetensors")
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "unrelated.pt")
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    cases = {
        "garbage.safetensors": "Cannot read", "missing.pt": "Cannot read",
        "unrelated.pt": "no tensor whose name and shape match", "list.pt": "not a state dict",
    }
    for name, message in cases.items():
        with pytest.raises(InvalidSpec, match=message):
            load_pretrained_weights(model, tmp_path / name)
