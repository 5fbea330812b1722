"""The networks `train.model` selects (our own, or any timm architecture), wrapped with their input
normalisation.

A model takes float32 images (N, C, H, W) scaled to 0..1 and returns logits. Normalisation lives inside it, so
ONNX, torch.export, MLflow and `predict` all feed the same plain input and cannot disagree about statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from image_classifier import backbones
from image_classifier.backbones import Weights, is_timm

if TYPE_CHECKING:  # annotations only: params.py needs pydantic, absent where the GPU benchmark runs
    from image_classifier.params import TrainParams


class QuickstartMLP(nn.Module):
    """The PyTorch "Learn the Basics" quickstart network: 784-512-512-10 with ReLU."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(channels * height * width, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear_relu_stack(self.flatten(images))


def conv_pool_bn(in_channels: int, out_channels: int, convs: int = 1) -> nn.Sequential:
    """3x3 convolution, 2x2 max pooling, then batch norm and ReLU on the pooled map; with `convs` 2, a second
    3x3 convolution, batch norm and ReLU at the pooled resolution (airbench's conv group).

    Pooling before normalising (as airbench does) gives batch norm and ReLU a quarter of the pixels; on a CPU
    those memory-bound layers cost as much as the convolutions. No conv bias: batch norm's shift replaces it.
    """
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    for _ in range(convs - 1):
        layers += [
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def conv_bn(in_channels: int, out_channels: int, pool: bool) -> nn.Sequential:
    """conv_pool_bn, or without its pooling (the same layers otherwise, so the parameter names match)."""
    block = conv_pool_bn(in_channels, out_channels)
    if not pool:
        block[1] = nn.Identity()
    return block


class SmallCNN(nn.Module):
    """A stem that halves the resolution, then two conv groups that double the channels and halve the
    resolution again, and a linear head over the remaining spatial grid (3x3 for 28x28 input, 4x4 for 32x32).

    Keeping the spatial grid in the head (rather than global pooling) keeps where a feature is, which clothes
    need. The stem is a 3x3 stride-2 convolution (`stem="strided"`) or a 2x2 stride-2 "patchify" one; either
    halves the resolution before anything else runs, which on a CPU is most of the saving. `convs_per_group` is
    1 or 2 (see conv_pool_bn). `stem_stride` 1 keeps the full resolution for images under 16 pixels, where
    three halvings would leave a 1x1 grid. Model files saved before these options existed hold none of them: the
    defaults rebuild them.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        width: int = 32,
        stem: str = "patchify",
        convs_per_group: int = 1,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        channels, height, width_px = image_shape
        kernel, padding = (3, 1) if stem == "strided" else (2, 0)
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=kernel, stride=stem_stride, padding=padding, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            conv_pool_bn(width, 2 * width, convs_per_group),
            conv_pool_bn(2 * width, 4 * width, convs_per_group),
            nn.Flatten(),
        )
        shrink = stem_stride * 4
        self.head = nn.Linear(4 * width * (height // shrink) * (width_px // shrink), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class ConvNet(nn.Module):
    """A 3x3 convolution at full resolution, three conv-pool-BN-ReLU blocks that double the channels, then
    global average pooling and a linear head: the default for photos and folders of your own images.

    Global pooling makes the answer the same wherever the object sits in the frame, which photos need and
    SmallCNN's grid head does not give; the full-resolution first convolution sees edges a 2x2 patchify stem
    would blur. On a 180-image folder of shapes at random places it took test accuracy from 0.67 to 0.94 at
    32 pixels (to 0.998 at 64).

    Only the first `pools` blocks halve the resolution (convnet_pools: fewer for tiny images, so the last block
    still sees a grid of at least 4x4); model files saved before the option existed rebuild with 3.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], num_classes: int, width: int = 32, pools: int = 3
    ) -> None:
        super().__init__()
        widths = [width, width, 2 * width, 4 * width]
        self.features = nn.Sequential(
            nn.Conv2d(image_shape[0], width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            *(conv_bn(widths[i], widths[i + 1], pool=i < pools) for i in range(3)),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


# Small grey images centred in the frame: SmallCNN's grid head and early stride-2 stem suit them and are fast.
CENTRED_DATASETS = frozenset({"fashion-mnist", "mnist", "kmnist"})


# The cnn that model_config builds (SmallCNN's defaults stay the layout older model files were saved with).
# Fashion-MNIST, 12 epochs, test accuracy over seeds 0, 1, 2, 2-core Intel Xeon with AMX (docs/benchmarks.md): the
# earlier default (patchify stem, one conv per group, width 20) 0.9276 at seed 0; this layout at width 16
# 0.9309, 0.9334, 0.9330 in 2.9-3.2 s an epoch; a 3x3 convolution and max pooling at full resolution as the stem
# instead 0.9314, 0.9312, 0.9352 in 4.1-4.5 s an epoch (max pooling of the 28x28 map was a third of the step).
CNN_LAYOUT = {"stem": "strided", "convs_per_group": 2}

# `train.width: auto`: the width each network was tuned at (cnn on Fashion-MNIST, convnet on small folders).
# A multiple of 16: on an AMX CPU the cnn above with the full-resolution stem ran an epoch in 4.1 s at width 16
# and 7.8 s at width 20 (oneDNN's bf16 tiles hold 16 or 32 channels), for 0.9314 and 0.9358 test accuracy.
DEFAULT_WIDTHS = {"cnn": 16, "convnet": 16, "mlp": 0}


def convnet_pools(image_size: int) -> int:
    """How many of ConvNet's three blocks halve the resolution: as many as leave a grid of at least 4x4 (3 from
    32 pixels up, 2 from 16, 1 below). Pooling an 8-pixel image three times leaves one pixel per channel."""
    return max(1, min(3, (image_size // 4).bit_length() - 1))


def cnn_layout(image_size: int) -> dict[str, Any]:
    """CNN_LAYOUT, with a stride-1 stem under 16 pixels (three halvings of 8 pixels leave a 1x1 grid)."""
    return {**CNN_LAYOUT, "stem_stride": 1} if image_size < 16 else dict(CNN_LAYOUT)


def resolve_model(model: str, width: int | str, dataset: str) -> tuple[str, int]:
    """`train.model` and `train.width` with `auto` resolved: `cnn` for the centred 28-pixel data sets and
    `convnet` for everything else, each at its own default width. A timm model has its own widths (0)."""
    name = model if model != "auto" else "cnn" if dataset in CENTRED_DATASETS else "convnet"
    if is_timm(name):
        return name, 0
    return name, DEFAULT_WIDTHS[name] if width == "auto" else width


def model_config(
    params: TrainParams,
    dataset: str,
    image_shape: list[int],
    classes: list[str],
    mean: list[float],
    std: list[float],
) -> tuple[dict[str, Any], Weights | None]:
    """What build_model needs to rebuild the network train.model names (saved with the weights), and the timm
    model's pretrained weights resolved to a checked local file (None for ours, or with train.pretrained "").

    Pretrained weights bring their own normalisation (the statistics they were trained with); otherwise the
    training split's `mean` and `std` apply."""
    model, width = resolve_model(params.model, params.width, dataset)
    weights, kwargs = None, {}
    if model == "cnn":
        kwargs = cnn_layout(image_shape[-1])
    if model == "convnet":
        kwargs = {"pools": convnet_pools(image_shape[-1])}
    if is_timm(model):
        backbones.check_architecture(model)
        weights = backbones.resolve_weights(params.pretrained, model)
        kwargs = backbones.model_kwargs(model, image_shape[-1])
        if weights:
            mean, std = backbones.normalisation(model, weights, image_shape[0])
    config = {
        "dataset": dataset,
        "model": model,
        "width": width,
        "test_time_flip": params.test_time_flip,
        "image_shape": image_shape,
        "classes": classes,
        "mean": mean,
        "std": std,
        **({"model_kwargs": kwargs} if kwargs else {}),
    }
    return config, weights


class ImageClassifier(nn.Module):
    """A network with the training set's per-channel mean and std applied first.

    With `test_time_flip`, inference (eval mode) averages the logits of each image and its mirror image, as
    airbench does: a model trained with flips sees both views, and the average is more accurate than either.

    Inference also divides the logits by `temperature` (a buffer, so it travels in the state dict), fitted after
    training so that softmax gives calibrated probabilities (calibration.py). Training always sees the raw
    logits: the temperature is 1 while training and, were a calibrated model trained further, its loss and
    gradients must not depend on a number fitted for another set of weights.

    Both are part of forward, so evaluate, ONNX, torch.export, MLflow and predict all give the same answer.
    """

    def __init__(
        self, network: nn.Module, mean: list[float], std: list[float], test_time_flip: bool = False
    ) -> None:
        super().__init__()
        self.network = network
        self.test_time_flip = test_time_flip
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        normalised = (images - self.mean) / self.std
        if self.training:
            return self.network(normalised)
        logits = self.network(normalised)
        if self.test_time_flip:
            logits = (logits + self.network(normalised.flip(3))) / 2
        return logits / self.temperature

    def set_temperature(self, value: float) -> None:
        with torch.no_grad():
            self.temperature.fill_(value)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Model files saved before calibration existed have no temperature: they load as they were, at 1.
        # load_state_dict works on a copy of the caller's dict, so adding the key here changes nothing of theirs.
        state_dict.setdefault(prefix + "temperature", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def build_model(config: dict[str, Any], pretrained: Weights | None = None) -> ImageClassifier:
    """The model a config describes: `model` (mlp, cnn, convnet or timm:<architecture>), `width`, `image_shape`,
    `classes`, `mean`, `std`, `test_time_flip` (absent in model files saved before it existed: off), and for timm
    models `model_kwargs`. `pretrained` weights (timm models only) are loaded through timm.

    The same config is saved beside the weights, so every later stage rebuilds exactly what was trained.
    """
    image_shape, num_classes = tuple(config["image_shape"]), len(config["classes"])
    if is_timm(config["model"]):
        network: nn.Module = backbones.create(
            config["model"], num_classes, image_shape[0], config.get("model_kwargs", {}), pretrained
        )
    elif config["model"] == "mlp":
        network = QuickstartMLP(image_shape, num_classes)
    elif config["model"] == "cnn":
        network = SmallCNN(image_shape, num_classes, config["width"], **config.get("model_kwargs", {}))
    elif config["model"] == "convnet":
        network = ConvNet(image_shape, num_classes, config["width"], **config.get("model_kwargs", {}))
    else:
        raise ValueError(f"unknown model {config['model']!r}")
    return ImageClassifier(network, config["mean"], config["std"], config.get("test_time_flip", False))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to the float32 0..1 input every model takes."""
    return images.float().div_(255)


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int, autocast: torch.dtype | None = None
) -> torch.Tensor:
    """Float32 logits for uint8 `images` (on the model's device), in batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = images.device
    outputs = []
    # An empty split still yields one (empty) batch, so the result has the right number of columns.
    for start in range(0, max(len(images), 1), batch_size):
        batch = to_float(images[start : start + batch_size])
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            outputs.append(model(batch).float())
    model.train(was_training)
    return torch.cat(outputs)
