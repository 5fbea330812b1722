"""Classify many images in batches: decoding in threads overlaps the model, rows come out in input order.

Every input gives exactly one row: its top classes and calibrated probabilities, or why it could not be read.
"""

import itertools
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from image_classifier.predictors import Predictor

# What a decoder yields for each input, in input order: (position, uint8 C×H×W pixels or None, error or None).
Decoded = tuple[int, np.ndarray | None, str | None]
# Decoded images waiting per thread: enough to keep every thread busy while the model runs a batch, few enough
# that memory stays small whatever the number of files.
AHEAD_PER_WORKER = 32


@dataclass
class Row:
    name: str  # the file's path as found, or test[i]
    top: list[tuple[str, float]] = field(default_factory=list)  # likeliest first; empty when `error`
    error: str | None = None
    actual: str | None = None  # the true class, for test-set images


def decode_iter(
    paths: list[Path], channels: int | Literal["auto"], size: int, workers: int | None = None
) -> Iterator[Decoded]:
    """Each file read by `read_image` (so the model sees the pixels preprocess gave it in training), as
    (position, array, None) or (position, None, error), in order, decoded by `workers` threads (default: one
    per core). Threads, not processes: Pillow and torchvision's decoders release the GIL, and a thread needs
    neither a fork after torch started its own threads nor a spawn that imports torch again.

    The same signature and yields as the decoder issue 25 adds to decoding.py: swapping to it is one import."""
    workers = workers or len(os.sched_getaffinity(0))
    inputs = iter(enumerate(paths))
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque[Future[Decoded]] = deque()

        def submit(item: tuple[int, Path]) -> None:
            pending.append(pool.submit(_decode_one, *item, channels, size))

        for item in itertools.islice(inputs, workers * AHEAD_PER_WORKER):
            submit(item)
        try:
            while pending:
                yield pending.popleft().result()
                item = next(inputs, None)
                if item is not None:  # one in for each one out
                    submit(item)
        finally:  # a consumer that stops early (an error, Ctrl-C) does not wait for the files queued ahead
            for future in pending:
                future.cancel()


def _decode_one(position: int, path: Path, channels: int | Literal["auto"], size: int) -> Decoded:
    from image_classifier.images import read_image

    try:
        return position, read_image(path, channels, (size, size)).numpy(), None
    except Exception as error:  # one bad file must not end a night's batch: it gets a row saying why
        message = " ".join(str(error).split()) or type(error).__name__
        return position, None, message.removeprefix(f"{path}: ")


def classify(
    names: list[str], decoded: Iterable[Decoded], predictor: Predictor, batch_size: int, top: int
) -> Iterator[Row]:
    """One Row per name, in order: `decoded` (from decode_iter, in order) run through the model `batch_size`
    images at a time, with the `top` likeliest classes of each."""
    waiting: list[Decoded] = []  # rows in order, failures included, until the batch is full
    images = 0
    for item in decoded:
        waiting.append(item)
        images += item[1] is not None
        if images == batch_size:
            yield from _run_batch(names, waiting, predictor, top)
            waiting, images = [], 0
    yield from _run_batch(names, waiting, predictor, top)


def _run_batch(names: list[str], items: list[Decoded], predictor: Predictor, top: int) -> Iterator[Row]:
    good = [array for _, array, _ in items if array is not None]
    probabilities = iter(softmax(predictor.logits(to_input(good))) if good else [])
    for position, array, error in items:
        if array is None:
            yield Row(names[position], error=error)
            continue
        row = next(probabilities)
        ranked = np.argsort(-row, kind="stable")[:top]
        yield Row(names[position], [(predictor.classes[i], float(row[i])) for i in ranked])


def to_input(images: list[np.ndarray]) -> np.ndarray:
    """uint8 C×H×W images → the float32 N×C×H×W batch in 0..1 every model takes (models.to_float)."""
    return np.stack(images).astype(np.float32) / np.float32(255)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from the model's temperature-scaled logits, in float64 so no backend rounds them apart."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)
