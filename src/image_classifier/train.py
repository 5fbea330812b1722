"""The training loop: the whole data set on the device as uint8, batches as index slices, augmentation batched.

Reads top to bottom: set up, (maybe) resume, then one loop over epochs that trains, validates, reports and
checkpoints. Nothing here syncs the device inside an epoch except the progress bar's counter.
"""

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from image_classifier.data import Split
from image_classifier.device import autocast_dtype
from image_classifier.distributed import max_across, rank_and_world, sum_across
from image_classifier.errors import UserError
from image_classifier.files import atomic_path, save_tensors
from image_classifier.models import build_model, predict_logits, to_float
from image_classifier.params import TrainParams
from image_classifier.plots import save_training_curves
from image_classifier.warm_start import WarmStartReport, load_initial_weights


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_accuracy: float
    final_checkpoint: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    compile_seconds: float = 0.0
    warm_start: WarmStartReport | None = None


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


def make_optimizer(params: TrainParams, model: nn.Module) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=params.lr,
            momentum=params.momentum,
            nesterov=params.nesterov,
            weight_decay=params.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)


def make_scheduler(
    params: TrainParams, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch. One-cycle warms up over the first quarter, then anneals linearly to ~0."""
    if params.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params.lr, total_steps=total_steps, pct_start=0.25, anneal_strategy="linear"
        )
    if params.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def batch_starts(num_samples: int, batch_size: int, processes: int = 1) -> list[int]:
    """Start index of every batch. A last batch too small to give each process two images is dropped
    (batch norm cannot train on one)."""
    starts = list(range(0, num_samples, batch_size))
    if len(starts) > 1 and num_samples - starts[-1] < 2 * processes:
        starts.pop()
    return starts


def resume_path(folder: Path, flat_params: dict[str, Any], data_files: list[Path]) -> Path:
    """Where an interrupted run's checkpoint waits: named by a fingerprint of params, data and this package's
    code, so a rerun after an interruption finds it and a run with anything changed does not."""
    fingerprint = hashlib.sha256(json.dumps(flat_params, sort_keys=True).encode())
    for path in [*data_files, *sorted(Path(__file__).parent.glob("*.py"))]:
        fingerprint.update(path.read_bytes())
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
        "final_train_loss": result.history[-1]["train_loss"],
        "train_seconds": sum(row["epoch_seconds"] for row in result.history),
        "compile_seconds": result.compile_seconds,
        **(extra or {}),
    }
    with atomic_path(metrics_json) as temp:
        temp.write_text(json.dumps(metrics, indent=2) + "\n")
    save_training_curves(result.history, curves_png)
    return metrics


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
) -> TrainResult:
    """Train `model_config`'s model; resume from `checkpoint_path` if an earlier run left one there, else start
    from the matching tensors of `init_weights` (a warm start, see warm_start.py) if given.

    `on_step(step, model)` runs after every optimiser step (the benchmark probes validation accuracy there).

    Under torchrun each process trains on its share of every global batch; only rank 0 reports and checkpoints.
    """
    rank, world = rank_and_world()
    if params.batch_size > len(train_split):
        raise UserError(
            f"train.batch_size = {params.batch_size} is larger than the training set ({len(train_split)} images)"
        )
    torch.manual_seed(params.seed)
    # Bit-identical reruns on the CPU; on a GPU some kernels have no deterministic version.
    torch.use_deterministic_algorithms(device.type == "cpu")
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
        model = build_model(model_config)
    model = model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(params, model)  # always fresh: a warm start takes weights, not optimiser state
    starts = batch_starts(len(train_split), params.batch_size, world)
    scheduler = make_scheduler(params, optimizer, params.epochs * len(starts))
    images, labels = train_split.images.to(device), train_split.labels.to(device)
    val_images, val_labels = val_split.images.to(device), val_split.labels.to(device)

    history: list[dict[str, float]] = []
    best = {"epoch": 0, "val_accuracy": -1.0, "state": copy.deepcopy(model.state_dict())}
    first_epoch = 1
    checkpoint: dict[str, Any] = {}
    if checkpoint_path.is_file():
        checkpoint = torch.load(checkpoint_path, weights_only=True, map_location=device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        generator.set_state(checkpoint["generator"].cpu())
        torch.set_rng_state(checkpoint["torch_rng"].cpu())
        history, best = checkpoint["history"], checkpoint["best"]
        if checkpoint.get("warm_start"):
            warm_start = WarmStartReport(**checkpoint["warm_start"])
        first_epoch = checkpoint["epoch"] + 1
        if rank == 0:
            print(f"resuming from {checkpoint_path} after epoch {checkpoint['epoch']}")
            for stats in history:  # so a new tracking run still holds the whole history
                on_epoch(stats)

    step_model: nn.Module = model
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    compile_seconds = 0.0
    if params.compile != "none":
        step_model = torch.compile(step_model, mode=params.compile)

    def train_step(
        batch_images: torch.Tensor, batch_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch_images = augment(batch_images, params.crop_padding, params.flip, augment_generator)
        inputs = to_float(batch_images).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = step_model(inputs)
            loss = F.cross_entropy(logits.float(), batch_labels, label_smoothing=params.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.detach(), (logits.argmax(1) == batch_labels).sum()

    for epoch in range(first_epoch, params.epochs + 1):
        model.train()
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        order = torch.randperm(len(labels), device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        seen = 0
        progress = tqdm(starts, desc=f"epoch {epoch}/{params.epochs}", leave=False, disable=rank != 0)
        for step, start in enumerate(progress):
            index = order[start : start + params.batch_size][rank::world]
            loss, hits = train_step(images[index], labels[index])
            if on_step:
                on_step((epoch - 1) * len(starts) + step + 1, model)
            if step == 0 and epoch == first_epoch and params.compile != "none":
                # The first compiled step is compilation: report it apart from training time.
                _synchronize(device)
                compile_seconds = time.perf_counter() - started
                started += compile_seconds
            # Track the first non-finite loss on the device: no host sync per batch.
            bad = ~torch.isfinite(loss) & (first_bad_step < 0)
            first_bad_step = torch.where(bad, step + 1, first_bad_step)
            loss_sum += loss * len(index)
            correct += hits
            seen += len(index)
        seen_total = torch.tensor(seen, device=device)
        sum_across(loss_sum, correct, seen_total)
        max_across(first_bad_step)
        seen = int(seen_total)
        if first_bad_step.item() >= 0:
            kept = (
                f"the last good checkpoint (epoch {epoch - 1}) is kept at {checkpoint_path}"
                if epoch > 1
                else "no epoch completed, so there is no checkpoint"
            )
            raise UserError(
                f"loss became non-finite at epoch {epoch}, step {first_bad_step.item()}; training stopped, "
                f"{kept}; lower train.lr"
            )
        val_logits = predict_logits(model, val_images, 1000, dtype)
        val_loss = F.cross_entropy(val_logits, val_labels).item() if len(val_labels) else math.nan
        val_accuracy = (
            (val_logits.argmax(1) == val_labels).float().mean().item() if len(val_labels) else math.nan
        )
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
        # With no validation set, the last epoch is the best one.
        score = val_accuracy if not math.isnan(val_accuracy) else epoch
        if score > best["val_accuracy"]:
            best = {"epoch": epoch, "val_accuracy": score, "state": copy.deepcopy(model.state_dict())}
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "best": best,
            "epoch": epoch,
            "warm_start": warm_start.as_dict() if warm_start else None,
        }
        if rank == 0:
            save_tensors(checkpoint, checkpoint_path)
            print(
                f"epoch {epoch}/{params.epochs}: train loss {stats['train_loss']:.4f} "
                f"acc {stats['train_accuracy']:.4f} | val loss {val_loss:.4f} acc {val_accuracy:.4f} | "
                f"{seconds:.1f}s, {stats['samples_per_second']:.0f}/s"
            )
            on_epoch(stats)

    return TrainResult(
        best_state={k: v.cpu() for k, v in best["state"].items()},
        best_epoch=best["epoch"],
        best_val_accuracy=best["val_accuracy"],
        final_checkpoint=checkpoint,
        history=history,
        compile_seconds=compile_seconds,
        warm_start=warm_start,
    )


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()
