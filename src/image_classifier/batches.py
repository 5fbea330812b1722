"""Where batches come from: the split held in device memory, or streamed from its mapped shards.

`train.data_in_memory` chooses. In memory (the fast path for data that fits): the uint8 split sits on the
device and a batch is an index into it. Streamed (any size): a background thread gathers the next batches
from the mapped shards (storage.py) into pinned memory while the device works on the current one, and each is
copied to the device without blocking. Both give the same images in the same order for the same indices, so on
a CPU a streamed run's weights are bit-identical to an in-memory run's. Under DDP each process gathers only its
own share of every batch.
"""

import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from image_classifier.data import Split
from image_classifier.distributed import max_across
from image_classifier.models import predict_logits
from image_classifier.storage import MappedImages

# `auto` holds the splits in memory when they take at most this share of the free memory: the rest is for the
# model, its activations, and on the CPU the rest of the machine.
IN_MEMORY_SHARE = 0.5
# Batches the reader thread gathers ahead of the one the device works on.
PREFETCH = 4
# The reader drops the mapped pages it has read from this process every this many bytes: resident memory stays
# bounded whatever the split's size (the OS page cache still holds them). The kernel maps neighbouring pages with
# each one read: 64 MB of random images left about 150 MB mapped (measured on the 128-pixel benchmark shards).
RELEASE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class DataMode:
    in_memory: bool
    line: str  # which mode, and why, in sizes


def choose_mode(
    setting: bool | Literal["auto"], splits: list[Split], device: torch.device, processes: int = 1
) -> DataMode:
    """In memory or streamed, for `train.data_in_memory` = `setting`, and a line saying why. Every process of a
    DDP run takes the same decision (streamed if any of them must stream)."""
    size = sum(math.prod(split.images.shape) for split in splits)
    # On the CPU every process holds its own copy in the same memory; a GPU holds one process's.
    copies = processes if device.type == "cpu" else 1
    free = free_memory(device)
    fits = size * copies <= IN_MEMORY_SHARE * free
    in_memory = fits if setting == "auto" else setting
    flag = torch.tensor(int(not in_memory), device=device)
    max_across(flag)
    in_memory = not flag.item()
    held = f"{_size(size)}{f' x {copies} processes' if copies > 1 else ''}"
    where = f"{IN_MEMORY_SHARE:.0%} of the {_size(free)} free on {device.type}"
    if setting != "auto":
        why = f"train.data_in_memory: {str(setting).lower()}"
    else:
        why = f"train.data_in_memory auto: {held} {'fits' if fits else 'does not fit'} in {where}"
    what = "held in memory" if in_memory else "streamed from the mapped shards"
    return DataMode(in_memory, f"training and validation images ({held}) {what} ({why})")


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's own memory, else the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"


class InMemory:
    """The whole split on the device; a batch is an index into it."""

    def __init__(self, split: Split, device: torch.device) -> None:
        images = split.in_memory().images
        self.images, self.labels = images.to(device), split.labels.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, order: torch.Tensor, starts: list[int], batch_size: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of every batch: `order[start:start + batch_size]`, this process's share of it."""
        for start in starts:
            index = order[start : start + batch_size][rank::world]
            yield self.images[index], self.labels[index]

    def logits(self, model: nn.Module, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return predict_logits(model, self.images, batch_size, dtype)


class Streamed:
    """The split's images stay on disk, mapped; each batch is gathered from them (ahead of use on an accelerator)."""

    def __init__(self, split: Split, device: torch.device) -> None:
        self.images = split.images
        if not isinstance(self.images, MappedImages):  # already in memory: nothing to stream, same batches
            self.images = self.images.contiguous()
        self.cpu_labels, self.labels = split.labels, split.labels.to(device)
        self.device = device
        self.pin = device.type == "cuda"
        self.unreleased = 0

    def __len__(self) -> int:
        return len(self.cpu_labels)

    def batches(
        self, order: torch.Tensor, starts: list[int], batch_size: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same batches as InMemory.batches, read from disk ahead of use."""
        order = order.cpu().numpy()  # once an epoch: batches are indexed on the host
        jobs = (order[start : start + batch_size][rank::world] for start in starts)
        for images, labels in self._reads(jobs):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def logits(self, model: nn.Module, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """predict_logits over the split, read in the same `batch_size` slices it would take in memory (so the
        logits are the same), ahead of use."""
        total = len(self)
        jobs = (
            np.arange(start, min(start + batch_size, total)) for start in range(0, max(total, 1), batch_size)
        )
        outputs = [
            predict_logits(model, images.to(self.device, non_blocking=True), batch_size, dtype)
            for images, _ in self._reads(jobs)
        ]
        return torch.cat(outputs)

    def _reads(self, jobs: Iterator[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`_read` of every job: ahead of use by a background thread for an accelerator, in this thread on a
        CPU. There the thread competed with training's for the same cores and gathering a batch is short (0.1 ms
        for 256 Fashion-MNIST images): streamed Fashion-MNIST trained at 9,300 images/s with it and 12,200
        without, in memory 12,500-15,500 (2-core AMD EPYC; docs/benchmarks.md)."""
        return prefetched(jobs, self._read) if self.device.type != "cpu" else map(self._read, jobs)

    def _read(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch on the host, in pinned memory when it goes to a GPU (so the copy can overlap compute).

        numpy only, no torch operator: a torch operator run from this thread would start a second team of
        OpenMP threads competing with training's for the same cores."""
        shape = (len(index), *self.images.shape[1:])
        images = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin)
        if isinstance(self.images, MappedImages):
            self.images.gather(index, out=images.numpy())
            self.unreleased += images.numel()
            if self.unreleased >= RELEASE_BYTES:
                self.images.release()
                self.unreleased = 0
        else:
            np.take(self.images.numpy(), index, axis=0, out=images.numpy())
        labels = torch.from_numpy(self.cpu_labels.numpy()[index])
        return images, labels.pin_memory() if self.pin else labels


def batch_source(split: Split, device: torch.device, in_memory: bool) -> InMemory | Streamed:
    return InMemory(split, device) if in_memory else Streamed(split, device)


def split_logits(
    model: nn.Module, split: Split, batch_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Float32 logits of every image of a split (evaluate, predict): streamed when it is mapped from disk."""
    device = device or next(model.parameters()).device
    source = Streamed(split, device) if isinstance(split.images, MappedImages) else InMemory(split, device)
    return source.logits(model, batch_size)


_DONE = object()


def prefetched(jobs: Iterator, read: Callable) -> Iterator:
    """`read(job)` for every job, computed by a background thread up to PREFETCH ahead, in order. An error in
    the thread is raised here; leaving the loop early stops the thread."""
    results: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for job in jobs:
                if not put(read(job)):
                    return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)

    thread = threading.Thread(target=work, name="batch-reader", daemon=True)
    thread.start()
    try:
        while (item := results.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
