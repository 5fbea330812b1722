"""Optimiser, learning-rate schedule, weight averaging (EMA) and class weights for the loss."""

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from image_classifier.params import TrainParams


def make_optimizer(params: TrainParams, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=params.momentum,
            nesterov=params.nesterov,
            weight_decay=params.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=params.weight_decay)


# One-cycle spends this share of the steps warming up to the peak learning rate.
ONECYCLE_WARMUP = 0.25


def warmup_epochs(params: TrainParams, epochs: int) -> int:
    """Epochs of the schedule's warm-up: validation gets worse there by design, so patience does not count."""
    return math.ceil(ONECYCLE_WARMUP * epochs) if params.schedule == "onecycle" else 0


def make_scheduler(
    params: TrainParams, optimizer: torch.optim.Optimizer, total_steps: int, lr: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch. One-cycle warms up over the first quarter, then anneals linearly to ~0."""
    if params.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, pct_start=ONECYCLE_WARMUP, anneal_strategy="linear"
        )
    if params.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of the weights, batch-norm statistics included, updated every step.

    The decay warms up as timm's ModelEmaV3 does, min(decay, (1 + t) / (10 + t)) at update t: a fixed 0.999
    would keep a run of a few hundred steps close to its random initial weights."""

    def warmed_up_ema(averaged: list, current: list, updates: torch.Tensor) -> None:
        # int() reads the count from the device; AveragedModel already does so on every update.
        done = int(updates)
        get_ema_multi_avg_fn(min(decay, (1 + done) / (10 + done)))(averaged, current, updates)

    return AveragedModel(model, multi_avg_fn=warmed_up_ema, use_buffers=True)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency loss weights (n / (k * count)), so every class carries the same total weight."""
    counts = torch.bincount(labels, minlength=num_classes).double().clamp(min=1)
    return (len(labels) / (num_classes * counts)).float()
