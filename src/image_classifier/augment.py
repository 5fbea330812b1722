"""Batched, per-image augmentation on the device: every image of a batch draws its own transform.

Two recipes (train.augment). `basic` (our networks): translation and flip on the uint8 batch, one gather.
`photo` (timm models): random resized crop, flip and TrivialAugment's geometric operations folded into one affine
map per image and applied with one `grid_sample`; then TrivialAugment's colour operations and random erasing,
each on the images that drew it. torchvision's v2 transforms and kornia's TrivialAugment draw one operation per
call, the same for a whole batch: that is not per-image augmentation, hence the few operations written here.
Mixup and cutmix (a random pairing and one mixing ratio per batch by design) are torchvision's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: params.py needs pydantic, absent where the GPU benchmark runs
    from image_classifier.params import TrainParams


def augment(images: torch.Tensor, crop_padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to `crop_padding` pixels (zero fill) and random horizontal flip, per image.

    Works on a whole uint8 batch at once with one gather, so it costs the same on a CPU or a GPU.
    """
    n, _, height, width = images.shape
    device = images.device
    if crop_padding:
        p = crop_padding
        padded = F.pad(images, (p, p, p, p))
        shifts = torch.randint(0, 2 * p + 1, (2, n, 1), device=device, generator=generator)
        rows = (torch.arange(height, device=device) + shifts[0])[:, None, :, None]
        cols = (torch.arange(width, device=device) + shifts[1])[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    if flip:
        flipped = torch.rand(n, device=device, generator=generator) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    return images


# --- photo ----------------------------------------------------------------------------------------------------

# Random resized crop's aspect-ratio range (torchvision's and timm's).
CROP_RATIO = (3 / 4, 4 / 3)
# TrivialAugment Wide (Müller & Hutter 2021), as torchvision lists it: the strongest magnitude of each operation;
# a magnitude is drawn per image from 31 even steps up to it. Translation is a share of the side (torchvision's
# 32 pixels at 224). Equalize is left out: a per-image histogram has no cheap batched form.
GEOMETRIC_OPS = {
    "shear_x": 0.99,
    "shear_y": 0.99,
    "translate_x": 32 / 224,
    "translate_y": 32 / 224,
    "rotate": 135.0,
}
COLOUR_OPS = ("brightness", "saturation", "contrast", "sharpness", "posterize", "solarize", "autocontrast")
ALL_OPS = ("identity", *GEOMETRIC_OPS, *COLOUR_OPS)
MAGNITUDE_STEPS = 31
# Random erasing (timm's defaults): the rectangle covers 2% to 1/3 of the image, aspect ratio 0.3 to 3.3.
ERASE_AREA, ERASE_RATIO = (0.02, 1 / 3), (0.3, 1 / 0.3)


def photo_augment(images: torch.Tensor, params: TrainParams, generator: torch.Generator) -> torch.Tensor:
    """uint8 images -> augmented float images in 0..1, per image: crop, flip, TrivialAugment, erasing."""
    n = len(images)
    x = images.float().div_(255)
    ops = torch.randint(0, len(ALL_OPS), (n,), device=x.device, generator=generator)
    strength = torch.randint(0, MAGNITUDE_STEPS, (n,), device=x.device, generator=generator) / (
        MAGNITUDE_STEPS - 1
    )
    sign = torch.where(torch.rand(n, device=x.device, generator=generator) < 0.5, -1.0, 1.0)
    if not params.trivial_augment:
        ops = torch.zeros_like(ops)  # identity for every image (the draws above keep the stream the same)
    theta = _crop_and_flip(n, params.crop_scale, params.flip, x.device, generator)
    theta = theta @ _geometric(ops, strength * sign)
    grid = F.affine_grid(theta[:, :2], list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = _colour(x, ops, strength, sign)
    if params.random_erasing:
        x = _erase(x, params.random_erasing, generator)
    return x


def _crop_and_flip(
    n: int, scale: list[float], flip: bool, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """Per image, the 3x3 map from output to input coordinates (-1..1) of a random resized crop: an area share in
    `scale` and an aspect ratio in CROP_RATIO, anywhere inside the image (a side longer than the image is cut to
    it, where torchvision redraws up to ten times), mirrored left-right with probability 1/2 when `flip`."""
    area = torch.empty(n, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n, device=device).uniform_(*map(math.log, CROP_RATIO), generator=generator)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1)
    height = (area / log_ratio.exp()).sqrt().clamp(max=1)
    centre = (torch.rand(2, n, device=device, generator=generator) * 2 - 1) * (
        1 - torch.stack([width, height])
    )
    mirror = torch.ones(n, device=device)
    if flip:
        mirror = torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 3, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = width * mirror, centre[0]
    theta[:, 1, 1], theta[:, 1, 2] = height, centre[1]
    theta[:, 2, 2] = 1
    return theta


def _geometric(ops: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """TrivialAugment's geometric operation of each image as a 3x3 map (identity for the other operations)."""
    n = len(ops)
    m = torch.eye(3, device=ops.device).repeat(n, 1, 1)
    for name, strongest in GEOMETRIC_OPS.items():
        chosen = ops == ALL_OPS.index(name)
        value = magnitude * strongest
        if name == "shear_x":
            m[:, 0, 1] = torch.where(chosen, value, m[:, 0, 1])
        elif name == "shear_y":
            m[:, 1, 0] = torch.where(chosen, value, m[:, 1, 0])
        elif name == "translate_x":
            m[:, 0, 2] = torch.where(chosen, 2 * value, m[:, 0, 2])  # the image spans 2 units
        elif name == "translate_y":
            m[:, 1, 2] = torch.where(chosen, 2 * value, m[:, 1, 2])
        else:
            angle = torch.deg2rad(value)
            cos, sin = torch.where(chosen, angle.cos(), 1.0), torch.where(chosen, angle.sin(), 0.0)
            m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    return m


def _colour(x: torch.Tensor, ops: torch.Tensor, strength: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TrivialAugment's colour operations, each computed only on the images that drew it."""
    for name in COLOUR_OPS:
        index = (ops == ALL_OPS.index(name)).nonzero().squeeze(1)
        if len(index):
            factor = (1 + 0.99 * strength[index] * sign[index]).view(-1, 1, 1, 1)
            x[index] = _colour_op(name, x[index], factor, strength[index].view(-1, 1, 1, 1)).clamp_(0, 1)
    return x


def _colour_op(name: str, x: torch.Tensor, factor: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    if name == "brightness":
        return x * factor
    if name == "saturation":
        return _blend(x, _grey(x).expand_as(x), factor)
    if name == "contrast":
        return _blend(x, _grey(x).mean((1, 2, 3), keepdim=True), factor)
    if name == "sharpness":  # PIL's: factor 0 is the smoothed image, 1 the original
        kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device) / 13
        channels = x.shape[1]
        smooth = F.conv2d(
            F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(channels, 1, 3, 3), groups=channels
        )
        return _blend(x, smooth, factor)
    if name == "posterize":  # keep 8 down to 2 bits
        bits = 8 - (strength * 6).round()
        step = 2 ** (8 - bits)
        return torch.div((x * 255).round(), step, rounding_mode="floor") * step / 255
    if name == "solarize":  # invert everything above a threshold that falls from 1 to 0
        return torch.where(x >= 1 - strength, 1 - x, x)
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)  # autocontrast, per channel
    return torch.where(high > low, (x - low) / (high - low).clamp(min=1e-6), x)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return other + factor * (x - other)


def _erase(x: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing: with `probability`, a rectangle of each image becomes uniform noise."""
    n, _, height, width = x.shape
    device = x.device
    area = torch.empty(n, device=device).uniform_(*ERASE_AREA, generator=generator)
    ratio = torch.empty(n, device=device).uniform_(*map(math.log, ERASE_RATIO), generator=generator).exp()
    h = ((area * ratio).sqrt() * height).round().clamp(1, height)
    w = ((area / ratio).sqrt() * width).round().clamp(1, width)
    top = (torch.rand(n, device=device, generator=generator) * (height - h + 1)).floor()
    left = (torch.rand(n, device=device, generator=generator) * (width - w + 1)).floor()
    erased = torch.rand(n, device=device, generator=generator) < probability
    rows = torch.arange(height, device=device).view(1, -1, 1)
    cols = torch.arange(width, device=device).view(1, 1, -1)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + h).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + w).view(-1, 1, 1))
        & erased.view(-1, 1, 1)
    )
    noise = torch.rand(x.shape, device=device, generator=generator)
    return torch.where(inside.unsqueeze(1), noise, x)


def mix(params: TrainParams, num_classes: int):
    """Mixup and/or cutmix as torchvision's batch transforms (`images, labels -> images, soft labels`), or None.
    With both on, each batch picks one. They draw from torch's global generator, which checkpoints save."""
    if not (params.mixup or params.cutmix):
        return None  # and no torchvision import: it takes a second, and brings PIL
    from torchvision.transforms import v2

    chosen = []
    if params.mixup:
        chosen.append(v2.MixUp(alpha=params.mixup, num_classes=num_classes))
    if params.cutmix:
        chosen.append(v2.CutMix(alpha=params.cutmix, num_classes=num_classes))
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)
