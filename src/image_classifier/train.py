"""The training loop: batches of uint8 images (the data set on the device, or streamed from disk: batches.py) in a
seeded index order, augmentation batched.

Reads top to bottom: plan (batch, lr, epochs), the state (fresh, warm-started, pretrained or resumed), the data,
the step, then one loop over epochs that trains, validates, keeps the best weights, checkpoints and stops early
when validation stops improving. The parts: train_state.py (what a checkpoint holds), train_step.py (one
optimiser step), train_epoch.py (one epoch and validation), reports.py (what a finished training writes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from image_classifier.backbones import Weights
from image_classifier.batches import DataMode, batch_source, choose_mode
from image_classifier.data import Split
from image_classifier.device import autocast_dtype, set_deterministic
from image_classifier.distributed import rank_and_world
from image_classifier.plan import TrainingPlan, batch_starts, plan_training
from image_classifier.reports import epoch_line
from image_classifier.train_epoch import EpochRunner
from image_classifier.train_state import CheckpointSaver, TrainState, build_state
from image_classifier.train_step import TrainStep
from image_classifier.warm_start import WarmStartReport

if TYPE_CHECKING:  # annotations only: params.py needs pydantic, absent where the GPU benchmark runs
    from image_classifier.params import TrainParams


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_accuracy: float
    final_checkpoint: dict[str, Any]
    plan: TrainingPlan
    history: list[dict[str, float]] = field(default_factory=list)
    data_mode: DataMode | None = None  # in memory or streamed, and why
    compile_seconds: float = 0.0
    warm_start: WarmStartReport | None = None
    stopped_early: bool = False
    precision: str = "fp32"  # what training ran in: train.precision with auto resolved


def train(
    params: TrainParams,
    model_config: dict[str, Any],
    train_split: Split,
    val_split: Split,
    device: torch.device,
    checkpoint_path: Path,
    on_epoch: Callable[[dict[str, float]], None] = lambda stats: None,
    init_weights: Path | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
    pretrained: Weights | None = None,
) -> TrainResult:
    """Train `model_config`'s model; resume from `checkpoint_path` if an earlier run left one there, else start
    from the matching tensors of `init_weights` (a warm start, see warm_start.py) if given, else from a timm
    model's `pretrained` weights if given.

    `on_step(step, model)` runs after every optimiser step with the model validation uses (the benchmark
    probes validation accuracy there).

    Under torchrun each process trains on its share of every global batch; only rank 0 reports and checkpoints.
    """
    rank, world = rank_and_world()
    lead = rank == 0
    pretraining = pretrained is not None
    plan = plan_training(
        params, len(train_split), world, train_split.images.shape[-1], model_config["model"], pretraining
    )
    if lead and plan.notes:
        print("\n".join(plan.notes))
    torch.manual_seed(params.seed)
    # Bit-identical reruns on the CPU; on a GPU some kernels have no deterministic version.
    set_deterministic(device.type == "cpu", compiled=params.compile != "none")
    starts = batch_starts(len(train_split), plan.batch_size, world)
    saver = CheckpointSaver(checkpoint_path, lead)
    state = build_state(
        params, plan, model_config, device, len(starts), len(val_split), saver, init_weights, pretrained
    )
    data_mode = choose_mode(params.data_in_memory, [train_split, val_split], device, world)
    if lead:
        _report_start(data_mode, state, checkpoint_path, on_epoch)
    dtype = autocast_dtype(device, params.precision, state.model)
    if lead and params.precision == "auto":
        print(f"train.precision auto: {'bf16' if dtype else 'fp32'} on {device.type}")
    step = TrainStep(params, plan, state, model_config, train_split.labels, device, dtype, rank, world)
    train_batches, val_batches = (
        batch_source(s, device, data_mode.in_memory) for s in (train_split, val_split)
    )
    epochs = EpochRunner(step, train_batches, val_batches, starts, rank, world, on_step)

    checkpoint, stopped_early = {}, False
    for epoch in range(state.epoch + 1, plan.epochs + 1):
        if step.unfreeze_if_due(epoch) and lead:
            print(f"epoch {epoch}: the backbone is unfrozen (train.freeze_epochs = {plan.freeze_epochs})")
        stats = epochs.run(epoch, saver)
        checkpoint = state.record(epoch, stats)
        saver.save(checkpoint, last_epoch=epoch == plan.epochs)
        if lead:
            print(epoch_line(stats, plan.epochs))
            on_epoch(stats)
        stopped_early = state.selection.should_stop() and epoch < plan.epochs
        if stopped_early:
            if lead:
                print(state.selection.stop_line(epoch))
            break
    return _result(state, plan, checkpoint, data_mode, epochs.compile_seconds, stopped_early, dtype)


def _report_start(
    data_mode: DataMode,
    state: TrainState,
    checkpoint_path: Path,
    on_epoch: Callable[[dict[str, float]], None],
) -> None:
    print(data_mode.line)
    if state.epoch:
        print(f"resuming from {checkpoint_path} after epoch {state.epoch}")
        for stats in state.history:  # so a new tracking run still holds the whole history
            on_epoch(stats)


def _result(
    state: TrainState,
    plan: TrainingPlan,
    checkpoint: dict[str, Any],
    data_mode: DataMode,
    compile_seconds: float,
    stopped_early: bool,
    dtype: torch.dtype | None,
) -> TrainResult:
    kept = state.selection.state
    return TrainResult(
        best_state={k: v.cpu() for k, v in kept["weights"].items()},
        best_epoch=kept["epoch"],
        best_val_accuracy=kept["val_accuracy"],
        final_checkpoint=checkpoint,
        plan=plan,
        history=state.history,
        data_mode=data_mode,
        compile_seconds=compile_seconds,
        warm_start=state.warm_start,
        stopped_early=stopped_early,
        precision="bf16" if dtype else "fp32",
    )
