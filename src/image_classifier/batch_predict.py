"""Classify many images in batches: decoding in threads overlaps the model, rows come out in input order.

Every input gives exactly one row: its top classes and calibrated probabilities, or why it could not be read.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from image_classifier.predictors import Predictor

# What a decoder yields for each input, in input order: (position, uint8 C×H×W pixels or None, error or None).
Decoded = tuple[int, np.ndarray | None, str | None]


@dataclass
class Row:
    name: str  # the file's path as found, or test[i]
    top: list[tuple[str, float]] = field(default_factory=list)  # likeliest first; empty when `error`
    error: str | None = None
    actual: str | None = None  # the true class, for test-set images


def decode_iter(
    paths: list[Path], channels: int | Literal["auto"], size: int, workers: int | None = None
) -> Iterator[Decoded]:
    """Each file decoded by preprocess's own decoder (decoding.decode_iter: the same `read_array`, threads, in
    order, bounded read-ahead), so the model sees the pixels it saw in training; an error's leading file name is
    dropped, since the row already names the file."""
    from image_classifier import decoding

    for position, pixels, error in decoding.decode_iter(paths, channels, size, workers):
        yield position, pixels, error and error.removeprefix(f"{paths[position]}: ")


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
