"""One optimiser step: augmentation, mixup, the forward pass under autocast, the loss, the update and the moving
average. It owns what changes how the model is called: freezing the backbone, DDP and torch.compile."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from image_classifier.augment import augment, mix, photo_augment
from image_classifier.models import to_float
from image_classifier.optim import class_weights, set_backbone_trainable
from image_classifier.plan import TrainingPlan
from image_classifier.train_state import TrainState

if TYPE_CHECKING:
    from image_classifier.params import TrainParams


class TrainStep:
    """`step(images, labels)` trains on one batch of uint8 images and returns its loss and correct count, both
    left on the device (reading them would sync it every batch)."""

    def __init__(
        self,
        params: TrainParams,
        plan: TrainingPlan,
        state: TrainState,
        model_config: dict[str, Any],
        labels: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype | None,
        rank: int,
        world: int,
    ) -> None:
        self.params, self.plan, self.state, self.device, self.dtype = params, plan, state, device, dtype
        self.world = world
        classes = len(model_config["classes"])
        self.memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
        self.mixing = mix(params, classes)
        self.loss_weights = (
            class_weights(labels, classes).to(device) if params.class_weights == "balanced" else None
        )
        # Each process augments different images, so it needs its own stream (only rank 0's is checkpointed).
        self.augment_generator = (
            state.generator if world == 1 else torch.Generator(device).manual_seed(params.seed + rank)
        )
        self.frozen = plan.freeze_epochs > state.epoch
        set_backbone_trainable(state.optimizer, not self.frozen)
        self.model = self._wrap(state.model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The model as the step calls it: under DDP and torch.compile when asked. Built again when the backbone
        is unfrozen: DDP only synchronises the parameters that needed gradients when it was made."""
        if self.world > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        compile_mode = self.params.compile
        return torch.compile(model, mode=compile_mode) if compile_mode != "none" else model

    def unfreeze_if_due(self, epoch: int) -> bool:
        """Unfreezes the backbone at the first epoch after train.freeze_epochs; True when it did."""
        if not self.frozen or epoch <= self.plan.freeze_epochs:
            return False
        self.frozen = False
        set_backbone_trainable(self.state.optimizer, True)
        self.model = self._wrap(self.state.model)
        return True

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params, state = self.params, self.state
        if self.plan.augment == "photo":
            inputs = photo_augment(images, params, self.augment_generator)
        else:
            inputs = to_float(augment(images, self.plan.crop_padding, params.flip, self.augment_generator))
        inputs = inputs.contiguous(memory_format=self.memory_format)
        targets = labels
        if self.mixing:  # soft labels; accuracy still counts the hard ones
            inputs, targets = self.mixing(inputs, labels)
        dtype = self.dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = self.model(inputs)
            loss = F.cross_entropy(
                logits.float(), targets, weight=self.loss_weights, label_smoothing=params.label_smoothing
            )
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        if state.ema:
            state.ema.update_parameters(state.model)
        return loss.detach(), (logits.argmax(1) == labels).sum()
