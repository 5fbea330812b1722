"""How much training a data set gets: the batch size, the learning rate and the number of epochs that `auto`
stands for, worked out from the size of the training split.

A few hundred photos need small batches and hundreds of epochs; Fashion-MNIST needs batches of 256 and a dozen
epochs. Both are the same rule: about `train.target_steps` optimiser steps, in batches small enough to give each
epoch several steps. Every choice is explained in one line, printed and logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from image_classifier.backbones import is_timm

if TYPE_CHECKING:  # annotations only: params.py needs pydantic, absent where the GPU benchmark runs
    from image_classifier.params import TrainParams

# `batch_size: auto` starts here, the batch the default learning rate was tuned for on Fashion-MNIST...
REFERENCE_BATCH = 256
# ...and halves it until an epoch has at least this many steps, but not below MIN_AUTO_BATCH images.
MIN_STEPS_PER_EPOCH = 8
MIN_AUTO_BATCH = 16
# `epochs: auto` never trains fewer epochs than this, however large the data set...
MIN_AUTO_EPOCHS = 3
# ...nor more than this, however small: train.target_steps on a few hundred images meant hundreds of passes over
# the same images. Measured with the convnet (one seed, test accuracy; docs/benchmarks.md): 990
# Fashion-MNIST PNGs 0.8194 / 0.8348 / 0.8433 at 30 / 60 / 120 epochs, 200 of them 0.75 / 0.825 / 0.775.
MAX_AUTO_EPOCHS = 60
# `crop_padding: auto` translates convnet's images from this size up (see plan_training).
SHIFT_FROM = 16
# What `auto` stands for per optimiser: SGD's values were tuned for cnn on Fashion-MNIST; AdamW's lr 1e-3 and
# weight decay 0.05 are timm's values for training from random weights.
OPTIMIZER_DEFAULTS = {"sgd": {"lr": 0.2, "weight_decay": 5e-4}, "adamw": {"lr": 1e-3, "weight_decay": 0.05}}
# Fine-tuning published weights, measured with ImageNet's EfficientNet-Lite0 on 1,000 Fashion-MNIST images at 64 px
# (2-core AMD EPYC, test accuracy, one seed; docs/benchmarks.md, fine-tuning), every other value the same:
# - AdamW's lr at batch 256 (square-root scaled like every lr): 0.833 at 4e-3, 0.849 at 8e-3, 0.850 at 1.6e-2;
# - the whole network trained from the first epoch, at one lr: 0.8165 against 0.7505 with one frozen epoch and
#   the backbone at a tenth of the classifier's lr (fastai's fine_tune), in 6 epochs;
# - more, smaller steps: 10 epochs in batches of 32 (280 steps) 0.866, of 64 (140 steps) 0.849;
# - train.frozen_stages 0 / 2 / 3 at 96 px: 0.8735 / 0.8685 / 0.8675 in 82 / 63 / 58 s of training (seed 1: 0.8790
#   against 0.8670 at 2), so it stays 0; 2 is the option for a faster run.
PRETRAINED_LR = 8e-3
PRETRAINED_FREEZE_EPOCHS = 0
PRETRAINED_BACKBONE_LR_SCALE = 1.0
FINE_TUNE_STEPS = 300
FINE_TUNE_MIN_STEPS_PER_EPOCH = 16
# `augment: auto` for timm models: torchvision's photo recipe (random resized crops down to 8% of the image,
# TrivialAugment, erasing) from this size on; below it the basic shifts and flips. At 64 px the photo recipe
# gave 0.606 against 0.797 for the basic one in 6 epochs: a crop of 8% of 64 pixels leaves a few pixels.
PHOTO_AUGMENT_FROM = 128


@dataclass(frozen=True)
class TrainingPlan:
    batch_size: int
    lr: float
    epochs: int
    steps_per_epoch: int
    crop_padding: int
    notes: tuple[str, ...]  # one line per value that differs from what params.yaml says
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    augment: str = "basic"
    freeze_epochs: int = 0
    backbone_lr_scale: float = 1.0
    frozen_stages: int = 0


def batch_starts(num_samples: int, batch_size: int, processes: int = 1) -> list[int]:
    """Start index of every batch. A last batch too small to give each process two images is dropped
    (batch norm cannot train on one)."""
    starts = list(range(0, num_samples, batch_size))
    if len(starts) > 1 and num_samples - starts[-1] < 2 * processes:
        starts.pop()
    return starts


def plan_training(
    params: TrainParams,
    num_samples: int,
    processes: int = 1,
    image_size: int = 28,
    model: str = "cnn",
    pretrained: bool = False,
) -> TrainingPlan:
    """Resolve every `auto` of train.* for a training split of `num_samples` images of `image_size` pixels, for
    the network `model` (resolved: cnn, convnet, mlp or timm:<name>), starting from `pretrained` weights or not."""
    notes: list[str] = []
    optim = _optimizer(params, model, pretrained, notes)
    batch_size, lr = _batch_and_lr(params, num_samples, optim["lr"], pretrained, notes)
    steps = len(batch_starts(num_samples, batch_size, processes))
    epochs = _epochs(params, steps, pretrained, notes)
    augment = params.augment
    if augment == "auto":
        augment = "photo" if is_timm(model) and image_size >= PHOTO_AUGMENT_FROM else "basic"
        notes.append(f"train.augment auto: {augment}")
    crop_padding = params.crop_padding
    if crop_padding == "auto":
        # A network that pools globally is meant for objects anywhere in the frame: teach it with shifts of
        # up to 1/8 of the image. cnn and mlp read fixed positions of centred images; shifts cost them accuracy
        # in short runs (docs/benchmarks.md). Photo augmentation crops instead.
        # Below SHIFT_FROM pixels a shift of even one pixel moves a large share of the object out of the
        # frame: 8-pixel digits lost 2 points of test accuracy (0.9666 against 0.9861 without).
        shifts = model == "convnet" and augment == "basic" and image_size >= SHIFT_FROM
        crop_padding = image_size // 8 if shifts else 0
        notes.append(f"train.crop_padding auto: {crop_padding} pixels")
    freeze_epochs, backbone_lr_scale, frozen_stages = _fine_tuning(params, model, pretrained, epochs, notes)
    return TrainingPlan(
        batch_size,
        lr,
        epochs,
        steps,
        crop_padding,
        tuple(notes),
        optim["optimizer"],
        optim["weight_decay"],
        augment,
        freeze_epochs,
        backbone_lr_scale,
        frozen_stages,
    )


def _optimizer(params: TrainParams, model: str, pretrained: bool, notes: list[str]) -> dict:
    """`optimizer`, `lr` and `weight_decay` with `auto` resolved: SGD for our networks, AdamW for timm's."""
    resolved = {"optimizer": params.optimizer, "lr": params.lr, "weight_decay": params.weight_decay}
    if params.optimizer == "auto":
        resolved["optimizer"] = "adamw" if is_timm(model) else "sgd"
    defaults = OPTIMIZER_DEFAULTS[resolved["optimizer"]]
    if pretrained and resolved["optimizer"] == "adamw":
        defaults = {**defaults, "lr": PRETRAINED_LR}
    for key in ("lr", "weight_decay"):
        if resolved[key] == "auto":
            resolved[key] = defaults[key]
    autos = [
        f"{key} {value:g}" if key != "optimizer" else str(value)
        for key, value in resolved.items()
        if getattr(params, key) == "auto"
    ]
    if autos:
        notes.append(f"train.optimizer/lr/weight_decay auto: {', '.join(autos)}")
    return resolved


def _batch_and_lr(
    params: TrainParams, num_samples: int, lr: float, pretrained: bool, notes: list[str]
) -> tuple[int, float]:
    if params.batch_size == "auto":
        min_steps = FINE_TUNE_MIN_STEPS_PER_EPOCH if pretrained else MIN_STEPS_PER_EPOCH
        batch_size = REFERENCE_BATCH
        while batch_size > MIN_AUTO_BATCH and num_samples / batch_size < min_steps:
            batch_size //= 2
        batch_size = min(batch_size, num_samples)
        if batch_size != REFERENCE_BATCH:
            # Square-root scaling keeps the noise of a step about constant; linear scaling (Goyal et al.)
            # was too timid for batches of 16 on a few hundred images (measured: docs/benchmarks.md).
            scaled = lr * math.sqrt(batch_size / REFERENCE_BATCH)
            steps = len(batch_starts(num_samples, batch_size))
            reason = f"at least {min_steps} steps per epoch"
            if steps < min_steps:  # the batch's floor binds: say so, not steps the set cannot give
                reason = (
                    f"{steps} step{'s' * (steps > 1)} per epoch where {min_steps} were the aim: an auto batch is "
                    f"at least {MIN_AUTO_BATCH} images or the whole set"
                )
            notes.append(
                f"train.batch_size auto: {batch_size} ({num_samples} training images, {reason}); "
                f"train.lr scaled to {scaled:.4g} (x sqrt({batch_size}/{REFERENCE_BATCH}))"
            )
            lr = scaled
        return batch_size, lr
    if params.batch_size > num_samples:
        notes.append(
            f"train.batch_size = {params.batch_size} is larger than the training set: using {num_samples} "
            "(the whole set) per step"
        )
        return num_samples, lr
    return params.batch_size, lr


def _epochs(params: TrainParams, steps: int, pretrained: bool, notes: list[str]) -> int:
    if params.epochs != "auto":
        return params.epochs
    target = FINE_TUNE_STEPS if pretrained else params.target_steps
    epochs = min(MAX_AUTO_EPOCHS, max(MIN_AUTO_EPOCHS, math.ceil(target / steps)))
    why = (
        f"{FINE_TUNE_STEPS} steps for pretrained weights" if pretrained else f"train.target_steps = {target}"
    )
    notes.append(
        f"train.epochs auto: {epochs} epochs of {steps} steps ({why}, within {MIN_AUTO_EPOCHS}..{MAX_AUTO_EPOCHS}"
        " epochs)"
    )
    return epochs


def _fine_tuning(
    params: TrainParams, model: str, pretrained: bool, epochs: int, notes: list[str]
) -> tuple[int, float, int]:
    """`freeze_epochs`, `backbone_lr_scale` and `frozen_stages`: they apply to timm models only (ours have no
    pretrained body)."""
    if not is_timm(model):
        return 0, 1.0, 0
    freeze, scale = params.freeze_epochs, params.backbone_lr_scale
    if freeze == "auto":
        freeze = PRETRAINED_FREEZE_EPOCHS if pretrained else 0
        notes.append(f"train.freeze_epochs auto: {freeze}")
    if scale == "auto":
        scale = PRETRAINED_BACKBONE_LR_SCALE if pretrained else 1.0
        notes.append(f"train.backbone_lr_scale auto: {scale:g}")
    if freeze >= epochs:
        notes.append(f"train.freeze_epochs = {freeze} covers all {epochs} epochs: only the classifier trains")
    return freeze, scale, params.frozen_stages
