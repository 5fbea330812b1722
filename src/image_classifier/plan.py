"""How much training a data set gets: the batch size, the learning rate and the number of epochs that `auto`
stands for, worked out from the size of the training split.

A few hundred photos need small batches and hundreds of epochs; Fashion-MNIST needs batches of 256 and a dozen
epochs. Both are the same rule: about `train.target_steps` optimiser steps, in batches small enough to give each
epoch several steps. Every choice is explained in one line, printed and logged.
"""

import math
from dataclasses import dataclass

from image_classifier.params import TrainParams

# `batch_size: auto` starts here, the batch the default learning rate was tuned for on Fashion-MNIST...
REFERENCE_BATCH = 256
# ...and halves it until an epoch has at least this many steps, but not below MIN_AUTO_BATCH images.
MIN_STEPS_PER_EPOCH = 8
MIN_AUTO_BATCH = 16
# `epochs: auto` never trains fewer epochs than this, however large the data set.
MIN_AUTO_EPOCHS = 3


@dataclass(frozen=True)
class TrainingPlan:
    batch_size: int
    lr: float
    epochs: int
    steps_per_epoch: int
    crop_padding: int
    notes: tuple[str, ...]  # one line per value that differs from what params.yaml says


def batch_starts(num_samples: int, batch_size: int, processes: int = 1) -> list[int]:
    """Start index of every batch. A last batch too small to give each process two images is dropped
    (batch norm cannot train on one)."""
    starts = list(range(0, num_samples, batch_size))
    if len(starts) > 1 and num_samples - starts[-1] < 2 * processes:
        starts.pop()
    return starts


def plan_training(
    params: TrainParams, num_samples: int, processes: int = 1, image_size: int = 28, model: str = "cnn"
) -> TrainingPlan:
    """Resolve `batch_size`, `lr`, `epochs` and `crop_padding` for a training split of `num_samples` images
    of `image_size` pixels, for the network `model` (resolved: cnn, convnet or mlp)."""
    notes = []
    lr = params.lr
    if params.batch_size == "auto":
        batch_size = REFERENCE_BATCH
        while batch_size > MIN_AUTO_BATCH and num_samples / batch_size < MIN_STEPS_PER_EPOCH:
            batch_size //= 2
        batch_size = min(batch_size, num_samples)
        if batch_size != REFERENCE_BATCH:
            # Square-root scaling keeps the noise of a step about constant; linear scaling (Goyal et al.)
            # was too timid for batches of 16 on a few hundred images (measured: README, small folders).
            lr = params.lr * math.sqrt(batch_size / REFERENCE_BATCH)
            notes.append(
                f"train.batch_size auto: {batch_size} ({num_samples} training images, at least "
                f"{MIN_STEPS_PER_EPOCH} steps per epoch); train.lr scaled to {lr:.4g} (x sqrt({batch_size}/"
                f"{REFERENCE_BATCH}))"
            )
    elif params.batch_size > num_samples:
        batch_size = num_samples
        notes.append(
            f"train.batch_size = {params.batch_size} is larger than the training set: using {batch_size} "
            "(the whole set) per step"
        )
    else:
        batch_size = params.batch_size
    steps = len(batch_starts(num_samples, batch_size, processes))
    if params.epochs == "auto":
        epochs = max(MIN_AUTO_EPOCHS, math.ceil(params.target_steps / steps))
        notes.append(
            f"train.epochs auto: {epochs} epochs of {steps} steps (train.target_steps = {params.target_steps})"
        )
    else:
        epochs = params.epochs
    crop_padding = params.crop_padding
    if crop_padding == "auto":
        # A network that pools globally is meant for objects anywhere in the frame: teach it with shifts of
        # up to 1/8 of the image. cnn and mlp read fixed positions of centred images; shifts cost them accuracy
        # in short runs (README, speed).
        crop_padding = image_size // 8 if model == "convnet" else 0
        notes.append(f"train.crop_padding auto: {crop_padding} pixels")
    return TrainingPlan(batch_size, lr, epochs, steps, crop_padding, tuple(notes))
