"""One epoch: every batch once through the step in a seeded order, then validation. Nothing syncs the device
inside the epoch except the progress bar's counter; a non-finite loss is tracked on the device and reported
once, at the end."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from image_classifier.batches import InMemory, Streamed
from image_classifier.device import inference_batch_size, synchronize
from image_classifier.distributed import max_across, sum_across
from image_classifier.errors import UserError
from image_classifier.train_state import CheckpointSaver
from image_classifier.train_step import TrainStep

# oneDNN's bf16 kernels on AMX CPUs have produced NaNs for some small shapes (deep networks on tiny images;
# oneDNN issue #5717): a NaN in bf16 on a CPU may not be the learning rate's fault.
BF16_CPU_HINT = " or set train.precision: fp32 (bf16 on this CPU)"


@dataclass
class EpochRunner:
    """What stays the same from one epoch to the next: the step, the data, this process's place in the run."""

    step: TrainStep
    train_batches: InMemory | Streamed
    val_batches: InMemory | Streamed
    starts: list[int]  # each global batch's first position in the epoch's order
    rank: int
    world: int
    on_step: Callable[[int, nn.Module], None] | None = None
    compile_seconds: float = 0.0  # the first compiled step, reported apart from training time

    def run(self, epoch: int, saver: CheckpointSaver) -> dict[str, float]:
        """Trains one epoch and validates; the epoch's row of the history."""
        step, state, device = self.step, self.step.state, self.step.device
        first_step_compiles = self.step.params.compile != "none" and not self.compile_seconds
        state.model.train()
        started = time.perf_counter()
        lr = state.optimizer.param_groups[0]["lr"]
        order = torch.randperm(len(self.train_batches), device=device, generator=state.generator)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
        seen = 0
        batch_size, epochs = step.plan.batch_size, step.plan.epochs
        batches = self.train_batches.batches(order, self.starts, batch_size, self.rank, self.world)
        # A live bar on a terminal only (disable=None): in a log file (CI, nohup, a queued experiment) its
        # carriage-return updates would pile up on one line; the epoch line is the log's record.
        progress = tqdm(
            batches,
            total=len(self.starts),
            desc=f"epoch {epoch}/{epochs}",
            leave=False,
            disable=None if self.rank == 0 else True,
        )
        for index, (images, labels) in enumerate(progress):
            loss, hits = step(images, labels)
            if self.on_step:
                self.on_step((epoch - 1) * len(self.starts) + index + 1, state.eval_model)
            if index == 0 and first_step_compiles:
                synchronize(device)
                self.compile_seconds = time.perf_counter() - started
                started += self.compile_seconds
            bad = ~torch.isfinite(loss) & (first_bad_step < 0)
            first_bad_step = torch.where(bad, index + 1, first_bad_step)
            loss_sum += loss * len(labels)
            correct += hits
            seen += len(labels)
        seen_total = torch.tensor(seen, device=device)
        sum_across(loss_sum, correct, seen_total)
        max_across(first_bad_step)
        seen = int(seen_total)
        if first_bad_step.item() >= 0:
            hint = BF16_CPU_HINT if step.dtype and device.type == "cpu" else ""
            raise UserError(
                f"loss became non-finite at epoch {epoch}, step {first_bad_step.item()}; training stopped, "
                f"{saver.what_is_kept()}; lower train.lr{hint}"
            )
        val_loss, val_accuracy = validate(state.eval_model, self.val_batches, step.dtype)
        synchronize(device)
        seconds = time.perf_counter() - started
        return {
            "epoch": epoch,
            "train_loss": loss_sum.item() / seen,
            "train_accuracy": correct.item() / seen,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": lr,
            "epoch_seconds": seconds,
            "samples_per_second": seen / seconds,
        }


def validate(model: nn.Module, val: InMemory | Streamed, dtype: torch.dtype | None) -> tuple[float, float]:
    """Validation loss and accuracy (NaN for an empty validation split)."""
    if len(val) == 0:
        return math.nan, math.nan
    batch_size = inference_batch_size(next(model.parameters()).device)
    logits, labels = val.logits(model, batch_size, dtype), val.labels
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()
