"""What a training run carries from epoch to epoch, and what its resumable checkpoint holds.

`TrainState.checkpoint()` and `TrainState.restore()` sit side by side: a key written by one is read by the other.
`build_state` makes the state (from scratch, a warm start, pretrained weights, or an interrupted run's
checkpoint); `CheckpointSaver` writes it at most once a second.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from image_classifier.backbones import Weights
from image_classifier.files import save_tensors
from image_classifier.models import build_model
from image_classifier.optim import (
    freeze_early_stages,
    make_ema,
    make_optimizer,
    make_scheduler,
    warmup_epochs,
)
from image_classifier.plan import TrainingPlan
from image_classifier.warm_start import WarmStartReport, load_initial_weights

if TYPE_CHECKING:  # annotations only: params.py needs pydantic, absent where the GPU benchmark runs
    from image_classifier.params import TrainParams

# A resumable checkpoint at most this often: an epoch of a 200-image folder takes a tenth of a second, and
# writing a checkpoint every epoch cost 2.7 s of its 278 epochs. An interruption loses at most this much work.
CHECKPOINT_SECONDS = 1.0


class Selection:
    """Which epoch's weights training keeps, and when it stops early.

    On a validation set of a few dozen images, accuracy moves in big steps and the highest score is often luck.
    So the kept epoch is the latest one whose accuracy is within one standard error (and at least one image) of
    the best seen so far (on a plateau, the last epoch: its learning rate is lowest). Training stops after
    `patience` epochs in which neither the best accuracy nor the lowest validation loss improved; epochs up to
    `grace` (the learning-rate warm-up) do not count.
    """

    def __init__(
        self, patience: int, val_size: int, grace: int = 0, state: dict[str, Any] | None = None
    ) -> None:
        self.patience, self.val_size, self.grace = patience, val_size, grace
        self.state = state or {
            "epoch": 0,
            "val_accuracy": -1.0,
            "weights": None,
            "max_accuracy": -1.0,
            "min_loss": math.inf,
            "stale_epochs": 0,
        }

    def update(self, epoch: int, accuracy: float, loss: float, model: nn.Module) -> None:
        s = self.state
        if self.val_size == 0:  # nothing to choose by: the last epoch is kept
            s.update(epoch=epoch, val_accuracy=math.nan, weights=_copy_state(model))
            return
        improved = accuracy > s["max_accuracy"] or loss < s["min_loss"]
        s["stale_epochs"] = 0 if improved or epoch <= self.grace else s["stale_epochs"] + 1
        s["max_accuracy"], s["min_loss"] = max(s["max_accuracy"], accuracy), min(s["min_loss"], loss)
        best = s["max_accuracy"]
        # At least one image of slack: at 100% the standard error is 0, and 13 of 14 is no real difference.
        slack = max(math.sqrt(best * (1 - best) / self.val_size), 1 / self.val_size)
        if accuracy >= best - slack - 1e-6:  # accuracies arrive as float32
            s.update(epoch=epoch, val_accuracy=accuracy, weights=_copy_state(model))

    def should_stop(self) -> bool:
        return self.patience > 0 and self.val_size > 0 and self.state["stale_epochs"] >= self.patience

    def stop_line(self, epoch: int) -> str:
        return (
            f"stopping early after epoch {epoch}: no better validation accuracy or loss in "
            f"{self.patience} epochs (train.patience)"
        )


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


@dataclass
class TrainState:
    """The model and everything that decides its next step: after `restore(checkpoint())` training goes on bit
    for bit as if it had never stopped."""

    model: nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # the batch order (and rank 0's augmentation)
    selection: Selection
    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0  # the last epoch completed
    warm_start: WarmStartReport | None = None

    @property
    def eval_model(self) -> nn.Module:
        """What validation scores and the stage saves: the moving average when there is one."""
        return self.ema.module if self.ema else self.model

    def record(self, epoch: int, stats: dict[str, float]) -> dict[str, Any]:
        """Adds a finished epoch (its history row, the kept weights' choice) and returns the new checkpoint."""
        self.history.append(stats)
        self.selection.update(epoch, stats["val_accuracy"], stats["val_loss"], self.eval_model)
        self.epoch = epoch
        return self.checkpoint()

    def checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),  # mixup and cutmix draw from the global generator
            "history": self.history,
            "selection": self.selection.state,
            "epoch": self.epoch,
            "warm_start": self.warm_start.as_dict() if self.warm_start else None,
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        if self.ema:
            self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.generator.set_state(checkpoint["generator"].cpu())
        torch.set_rng_state(checkpoint["torch_rng"].cpu())
        self.history = checkpoint["history"]
        selection = self.selection
        self.selection = Selection(
            selection.patience, selection.val_size, selection.grace, checkpoint["selection"]
        )
        self.epoch = checkpoint["epoch"]
        if checkpoint.get("warm_start"):
            self.warm_start = WarmStartReport(**checkpoint["warm_start"])


def resume_path(folder: Path, flat_params: dict[str, Any], data_files: list[Path]) -> Path:
    """Where an interrupted run's checkpoint waits: named by a fingerprint of params, data and this package's
    code, so a rerun after an interruption finds it and a run with anything changed does not."""
    fingerprint = hashlib.sha256(json.dumps(flat_params, sort_keys=True).encode())
    for path in [*data_files, *sorted(Path(__file__).parent.rglob("*.py"))]:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:  # a stored split is a folder
            fingerprint.update(file.read_bytes())
    return Path(folder) / f"train-{fingerprint.hexdigest()[:16]}.pt"


class CheckpointSaver:
    """The resumable checkpoint's file: written at most every CHECKPOINT_SECONDS (and after the last epoch), by
    the lead process only."""

    def __init__(self, path: Path, lead: bool) -> None:
        self.path, self.lead = path, lead
        self.last_saved, self.saved_epoch = -math.inf, 0

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self, device: torch.device) -> dict[str, Any]:
        checkpoint = torch.load(self.path, weights_only=True, map_location=device)
        self.saved_epoch = checkpoint["epoch"]
        return checkpoint

    def save(self, checkpoint: dict[str, Any], last_epoch: bool) -> None:
        if self.lead and (time.monotonic() - self.last_saved >= CHECKPOINT_SECONDS or last_epoch):
            save_tensors(checkpoint, self.path)
            self.last_saved, self.saved_epoch = time.monotonic(), checkpoint["epoch"]

    def what_is_kept(self) -> str:
        if self.saved_epoch:
            return f"the last good checkpoint (epoch {self.saved_epoch}) is kept at {self.path}"
        return "no epoch completed, so there is no checkpoint"


def build_state(
    params: TrainParams,
    plan: TrainingPlan,
    model_config: dict[str, Any],
    device: torch.device,
    steps_per_epoch: int,
    val_size: int,
    saver: CheckpointSaver,
    init_weights: Path | None = None,
    pretrained: Weights | None = None,
) -> TrainState:
    """A fresh state, or the interrupted run's when `saver` has a checkpoint. Starts from the matching tensors of
    `init_weights` (a warm start) or a timm model's `pretrained` weights, unless the checkpoint already holds
    weights (then loading them would be wasted)."""
    resuming = saver.exists()
    warm_start = None
    if init_weights is not None and not resuming:
        model, warm_start = load_initial_weights(model_config, init_weights, params.init_from or None)
        if saver.lead:
            print("\n".join(warm_start.lines()))
    else:
        model = build_model(model_config, None if resuming else pretrained)
    memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    freeze_early_stages(model, plan.frozen_stages)
    ema = make_ema(model, params.ema_decay) if params.ema else None
    optimizer = make_optimizer(params, plan, model)  # always fresh: a warm start takes weights only
    state = TrainState(
        model=model,
        ema=ema,
        optimizer=optimizer,
        scheduler=make_scheduler(params, optimizer, plan.epochs * steps_per_epoch),
        generator=torch.Generator(device).manual_seed(params.seed),  # same on every process: same batches
        selection=Selection(params.patience, val_size, warmup_epochs(params, plan.epochs)),
        warm_start=warm_start,
    )
    if resuming:
        state.restore(saver.load(device))
        if saver.lead:
            print(f"resuming from {saver.path} after epoch {state.epoch}")
    return state
