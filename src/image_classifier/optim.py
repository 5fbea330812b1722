"""Optimiser (parameter groups, freezing), learning-rate schedule, weight averaging (EMA) and class weights for
the loss."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from image_classifier.errors import UserError
from image_classifier.plan import TrainingPlan

if TYPE_CHECKING:  # annotations only: params.py needs pydantic, absent where the GPU benchmark runs
    from image_classifier.params import TrainParams


def parameter_groups(model: nn.Module, plan: TrainingPlan) -> list[dict]:
    """The optimiser's parameter groups. Our networks: one group, as the quickstart has it. timm networks
    (ImageClassifier around a timm model): the new classifier at `plan.lr`, the pretrained backbone at
    `plan.lr x backbone_lr_scale`, and, as in timm's own training, no weight decay on biases and norm layers
    (1-D tensors). Backbone groups carry `backbone: True`, which freezing reads."""
    network = getattr(model, "network", model)
    if not hasattr(network, "get_classifier"):
        return [{"params": list(model.parameters()), "lr": plan.lr, "weight_decay": plan.weight_decay}]
    head = {id(p) for p in network.get_classifier().parameters()}
    trained = [p for p in network.parameters() if p.requires_grad]  # not the stages freeze_early_stages froze
    groups = []
    for backbone in (True, False):
        lr = plan.lr * (plan.backbone_lr_scale if backbone else 1.0)
        for decay in (True, False):
            members = [p for p in trained if (id(p) not in head) == backbone and (p.ndim > 1) == decay]
            if members:
                groups.append(
                    {
                        "params": members,
                        "lr": lr,
                        "weight_decay": plan.weight_decay if decay else 0.0,
                        "backbone": backbone,
                    }
                )
    return groups


def freeze_early_stages(model: nn.Module, stages: int) -> int:
    """Stop training the first `stages` feature stages of a timm network (timm's feature_info; the stem and
    every layer before the end of that stage): they keep their pretrained weights for the whole run, and their
    batch-norm statistics still follow the new images. Returns how many parameters it froze.

    A stage ends where the next one's parameters begin: timm registers a network's layers in the order they
    run."""
    network = getattr(model, "network", model)
    if stages == 0:
        return 0
    feature_stages = [stage["module"] for stage in getattr(network, "feature_info", [])]
    if stages >= len(feature_stages):
        raise UserError(
            f"train.frozen_stages = {stages}: the network has {len(feature_stages)} stages and at least the "
            "last one has to train (train.freeze_epochs freezes the whole backbone)"
        )
    later = tuple(f"{module}." for module in feature_stages[stages:])
    named = list(network.named_parameters())
    first_trained = next((i for i, (name, _) in enumerate(named) if name.startswith(later)), 0)
    for _, parameter in named[:first_trained]:
        parameter.requires_grad_(False)
    return first_trained


def make_optimizer(params: TrainParams, plan: TrainingPlan, model: nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(model, plan)
    if plan.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=plan.lr,
            momentum=params.momentum,
            nesterov=params.nesterov,
            weight_decay=plan.weight_decay,
        )
    return torch.optim.AdamW(groups, lr=plan.lr, weight_decay=plan.weight_decay)


def set_backbone_trainable(optimizer: torch.optim.Optimizer, trainable: bool) -> None:
    """Freeze or unfreeze the pretrained backbone. A frozen parameter gets no gradient, so the optimiser skips
    it (no step, no weight decay) and backpropagation stops at the classifier: frozen epochs are also faster."""
    for group in optimizer.param_groups:
        if group.get("backbone"):
            for parameter in group["params"]:
                parameter.requires_grad_(trainable)


# One-cycle spends this share of the steps warming up to the peak learning rate.
ONECYCLE_WARMUP = 0.25


def warmup_epochs(params: TrainParams, epochs: int) -> int:
    """Epochs of the schedule's warm-up: validation gets worse there by design, so patience does not count."""
    return math.ceil(ONECYCLE_WARMUP * epochs) if params.schedule in ("onecycle", "cosine") else 0


def make_scheduler(
    params: TrainParams, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch; each parameter group peaks at its own learning rate. One-cycle warms up over the
    first quarter, then anneals linearly to ~0; cosine warms up linearly as long, then follows a cosine to 0."""
    peaks = [group["lr"] for group in optimizer.param_groups]
    if params.schedule == "onecycle" and total_steps >= 3:
        # OneCycleLR divides by zero when its warm-up is under two steps: a run of a handful of steps warms up
        # for two (and one of fewer than three steps keeps a constant rate).
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=peaks,
            total_steps=total_steps,
            pct_start=max(ONECYCLE_WARMUP, 2 / total_steps),
            anneal_strategy="linear",
        )
    if params.schedule == "cosine":
        warmup = max(1, round(ONECYCLE_WARMUP * total_steps))

        def warmup_then_cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_cosine)
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
