"""The training loop: batches of uint8 images (the data set on the device, or streamed from disk: batches.py) in a
seeded index order, augmentation batched.

Reads top to bottom: plan (batch, lr, epochs), set up, (maybe) resume, then one loop over epochs that trains,
validates, keeps the best weights, checkpoints and stops early when validation stops improving. Nothing here
syncs the device inside an epoch except the progress bar's counter.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from image_classifier.augment import augment, mix, photo_augment
from image_classifier.backbones import Weights
from image_classifier.batches import DataMode, InMemory, Streamed, batch_source, choose_mode
from image_classifier.data import Split
from image_classifier.device import autocast_dtype, set_deterministic
from image_classifier.distributed import max_across, rank_and_world, sum_across
from image_classifier.errors import UserError
from image_classifier.files import atomic_path, save_tensors
from image_classifier.models import build_model, to_float
from image_classifier.optim import (
    class_weights,
    make_ema,
    make_optimizer,
    make_scheduler,
    set_backbone_trainable,
    warmup_epochs,
)
from image_classifier.plan import TrainingPlan, batch_starts, plan_training

if TYPE_CHECKING:  # annotations only: params.py needs pydantic, absent where the GPU benchmark runs
    from image_classifier.params import TrainParams
from image_classifier.warm_start import WarmStartReport, load_initial_weights

# A resumable checkpoint at most this often: an epoch of a 200-image folder takes a tenth of a second, and
# writing a checkpoint every epoch cost 2.7 s of its 278 epochs. An interruption loses at most this much work.
CHECKPOINT_SECONDS = 1.0
# oneDNN's bf16 kernels on AMX CPUs have produced NaNs for some small shapes (deep networks on tiny images;
# oneDNN issue #5717): a NaN in bf16 on a CPU may not be the learning rate's fault.
BF16_CPU_HINT = " or set train.precision: fp32 (bf16 on this CPU)"


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


def resume_path(folder: Path, flat_params: dict[str, Any], data_files: list[Path]) -> Path:
    """Where an interrupted run's checkpoint waits: named by a fingerprint of params, data and this package's
    code, so a rerun after an interruption finds it and a run with anything changed does not."""
    fingerprint = hashlib.sha256(json.dumps(flat_params, sort_keys=True).encode())
    for path in [*data_files, *sorted(Path(__file__).parent.glob("*.py"))]:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:  # a stored split is a folder
            fingerprint.update(file.read_bytes())
    return Path(folder) / f"train-{fingerprint.hexdigest()[:16]}.pt"


def write_reports(
    result: TrainResult,
    history_csv: Path,
    metrics_json: Path,
    curves_png: Path,
    extra: dict[str, float] | None = None,
) -> dict[str, float]:
    """The per-epoch history (a DVC plots file), the summary metrics (a DVC metrics file, with `extra` such as
    the calibration's) and a curves PNG."""
    columns = list(result.history[0])
    rows = [",".join(columns)] + [",".join(f"{row[c]:.6g}" for c in columns) for row in result.history]
    with atomic_path(history_csv) as temp:
        temp.write_text("\n".join(rows) + "\n")
    metrics = {
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "epochs_trained": len(result.history),
        "final_train_loss": result.history[-1]["train_loss"],
        "train_seconds": sum(row["epoch_seconds"] for row in result.history),
        "compile_seconds": result.compile_seconds,
        **(extra or {}),
    }
    with atomic_path(metrics_json) as temp:
        temp.write_text(json.dumps(metrics, indent=2) + "\n")
    # Here, not at the top: matplotlib is absent where the GPU benchmark trains (only torch is installed).
    from image_classifier.plots import save_training_curves

    save_training_curves(result.history, curves_png)
    return metrics


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


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


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
    image_size = train_split.images.shape[-1]
    plan = plan_training(
        params, len(train_split), world, image_size, model_config["model"], pretrained is not None
    )
    if rank == 0 and plan.notes:
        print("\n".join(plan.notes))
    torch.manual_seed(params.seed)
    # Bit-identical reruns on the CPU; on a GPU some kernels have no deterministic version.
    set_deterministic(device.type == "cpu", compiled=params.compile != "none")
    generator = torch.Generator(device).manual_seed(params.seed)  # same on every process: same batches
    # Each process augments different images, so it needs its own stream (only rank 0's is checkpointed).
    augment_generator = generator if world == 1 else torch.Generator(device).manual_seed(params.seed + rank)
    memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
    dtype = autocast_dtype(device, params.precision)

    warm_start = None
    # A resume checkpoint already holds the weights (warm-started or not): loading init_weights would be wasted.
    if init_weights is not None and not checkpoint_path.is_file():
        model, warm_start = load_initial_weights(model_config, init_weights, params.init_from or None)
        if rank == 0:
            print("\n".join(warm_start.lines()))
    else:
        model = build_model(model_config, None if checkpoint_path.is_file() else pretrained)
    model = model.to(device, memory_format=memory_format)
    ema = make_ema(model, params.ema_decay) if params.ema else None
    eval_model = ema.module if ema else model  # what validation scores and the stage saves
    optimizer = make_optimizer(params, plan, model)  # always fresh: a warm start takes weights only
    starts = batch_starts(len(train_split), plan.batch_size, world)
    scheduler = make_scheduler(params, optimizer, plan.epochs * len(starts))
    mixing = mix(params, len(model_config["classes"]))
    data_mode = choose_mode(params.data_in_memory, [train_split, val_split], device, world)
    if rank == 0:
        print(data_mode.line)
    train_batches = batch_source(train_split, device, data_mode.in_memory)
    val_batches = batch_source(val_split, device, data_mode.in_memory)
    loss_weights = None
    if params.class_weights == "balanced":
        loss_weights = class_weights(train_split.labels, len(model_config["classes"])).to(device)

    history: list[dict[str, float]] = []
    grace = warmup_epochs(params, plan.epochs)
    selection = Selection(params.patience, len(val_batches), grace)
    first_epoch = 1
    checkpoint: dict[str, Any] = {}
    if checkpoint_path.is_file():
        checkpoint = torch.load(checkpoint_path, weights_only=True, map_location=device)
        model.load_state_dict(checkpoint["model"])
        if ema:
            ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        generator.set_state(checkpoint["generator"].cpu())
        torch.set_rng_state(checkpoint["torch_rng"].cpu())
        history = checkpoint["history"]
        selection = Selection(params.patience, len(val_batches), grace, checkpoint["selection"])
        if checkpoint.get("warm_start"):
            warm_start = WarmStartReport(**checkpoint["warm_start"])
        first_epoch = checkpoint["epoch"] + 1
        if rank == 0:
            print(f"resuming from {checkpoint_path} after epoch {checkpoint['epoch']}")
            for stats in history:  # so a new tracking run still holds the whole history
                on_epoch(stats)

    def wrap(model: nn.Module) -> nn.Module:
        """The model as the training step calls it: under DDP and torch.compile when asked. Built again when
        the backbone is unfrozen: DDP only synchronises the parameters that needed gradients when it was made."""
        if world > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None
            )
        return torch.compile(model, mode=params.compile) if params.compile != "none" else model

    frozen = plan.freeze_epochs >= first_epoch
    set_backbone_trainable(optimizer, not frozen)
    step_model = wrap(model)
    compile_seconds = 0.0

    def train_step(
        batch_images: torch.Tensor, batch_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if plan.augment == "photo":
            inputs = photo_augment(batch_images, params, augment_generator)
        else:
            inputs = to_float(augment(batch_images, plan.crop_padding, params.flip, augment_generator))
        inputs = inputs.contiguous(memory_format=memory_format)
        targets = batch_labels
        if mixing:  # soft labels; accuracy below still counts the hard ones
            inputs, targets = mixing(inputs, batch_labels)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = step_model(inputs)
            loss = F.cross_entropy(
                logits.float(), targets, weight=loss_weights, label_smoothing=params.label_smoothing
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema:
            ema.update_parameters(model)
        return loss.detach(), (logits.argmax(1) == batch_labels).sum()

    stopped_early = False
    last_saved, saved_epoch = -math.inf, first_epoch - 1
    for epoch in range(first_epoch, plan.epochs + 1):
        if frozen and epoch > plan.freeze_epochs:
            frozen = False
            set_backbone_trainable(optimizer, True)
            step_model = wrap(model)
            if rank == 0:
                print(f"epoch {epoch}: the backbone is unfrozen (train.freeze_epochs = {plan.freeze_epochs})")
        model.train()
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        order = torch.randperm(len(train_batches), device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        seen = 0
        batches = train_batches.batches(order, starts, plan.batch_size, rank, world)
        # A live bar on a terminal only (disable=None): in a log file (CI, nohup, a queued experiment) its
        # carriage-return updates would pile up on one line; the epoch line below is the log's record.
        progress = tqdm(
            batches,
            total=len(starts),
            desc=f"epoch {epoch}/{plan.epochs}",
            leave=False,
            disable=None if rank == 0 else True,
        )
        for step, (batch_images, batch_labels) in enumerate(progress):
            loss, hits = train_step(batch_images, batch_labels)
            if on_step:
                on_step((epoch - 1) * len(starts) + step + 1, eval_model)
            if step == 0 and epoch == first_epoch and params.compile != "none":
                # The first compiled step is compilation: report it apart from training time.
                _synchronize(device)
                compile_seconds = time.perf_counter() - started
                started += compile_seconds
            # Track the first non-finite loss on the device: no host sync per batch.
            bad = ~torch.isfinite(loss) & (first_bad_step < 0)
            first_bad_step = torch.where(bad, step + 1, first_bad_step)
            loss_sum += loss * len(batch_labels)
            correct += hits
            seen += len(batch_labels)
        seen_total = torch.tensor(seen, device=device)
        sum_across(loss_sum, correct, seen_total)
        max_across(first_bad_step)
        seen = int(seen_total)
        if first_bad_step.item() >= 0:
            kept = (
                f"the last good checkpoint (epoch {saved_epoch}) is kept at {checkpoint_path}"
                if saved_epoch
                else "no epoch completed, so there is no checkpoint"
            )
            raise UserError(
                f"loss became non-finite at epoch {epoch}, step {first_bad_step.item()}; training stopped, "
                f"{kept}; lower train.lr{BF16_CPU_HINT if dtype and device.type == 'cpu' else ''}"
            )
        val_loss, val_accuracy = _validate(eval_model, val_batches, dtype)
        _synchronize(device)
        seconds = time.perf_counter() - started
        stats = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / seen,
            "train_accuracy": correct.item() / seen,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": lr,
            "epoch_seconds": seconds,
            "samples_per_second": seen / seconds,
        }
        history.append(stats)
        selection.update(epoch, val_accuracy, val_loss, eval_model)
        checkpoint = {
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "selection": selection.state,
            "epoch": epoch,
            "warm_start": warm_start.as_dict() if warm_start else None,
        }
        if rank == 0:
            if time.monotonic() - last_saved >= CHECKPOINT_SECONDS or epoch == plan.epochs:
                save_tensors(checkpoint, checkpoint_path)
                last_saved, saved_epoch = time.monotonic(), epoch
            print(
                f"epoch {epoch}/{plan.epochs}: train loss {stats['train_loss']:.4f} "
                f"acc {stats['train_accuracy']:.4f} | val loss {val_loss:.4f} acc {val_accuracy:.4f} | "
                f"{seconds:.1f}s, {stats['samples_per_second']:.0f}/s"
            )
            on_epoch(stats)
        if selection.should_stop() and epoch < plan.epochs:
            stopped_early = True
            if rank == 0:
                print(
                    f"stopping early after epoch {epoch}: no better validation accuracy or loss in "
                    f"{params.patience} epochs (train.patience)"
                )
            break

    kept = selection.state
    return TrainResult(
        best_state={k: v.cpu() for k, v in kept["weights"].items()},
        best_epoch=kept["epoch"],
        best_val_accuracy=kept["val_accuracy"],
        final_checkpoint=checkpoint,
        plan=plan,
        history=history,
        data_mode=data_mode,
        compile_seconds=compile_seconds,
        warm_start=warm_start,
        stopped_early=stopped_early,
    )


def _validate(model: nn.Module, val: InMemory | Streamed, dtype: torch.dtype | None) -> tuple[float, float]:
    """Validation loss and accuracy (NaN for an empty validation split)."""
    if len(val) == 0:
        return math.nan, math.nan
    logits, labels = val.logits(model, 1000, dtype), val.labels
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()
