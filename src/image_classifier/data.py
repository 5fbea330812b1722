"""A data set's splits as uint8 images and int64 labels: validating them, drawing stratified splits, their pixel
statistics, and storing and loading them (raw_formats.py and folder.py decode them; preprocess.py puts it together).

Each split is stored as a folder of uint8 image shards and a label file (storage.py): memory-mapped when read,
never unpickled. A split's images are a tensor (decoded in memory, or loaded) or MappedImages (read from disk on
demand); everything here works on either, a bounded chunk at a time.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from image_classifier.datasets import DatasetSpec
from image_classifier.errors import UserError, one_line
from image_classifier.files import atomic_path
from image_classifier.storage import CHUNK_BYTES, MappedImages, read_split, write_split

# How to recover a damaged processed file: DVC's cache has the last good copy, or the stage rebuilds it.
_REBUILD = "restore it with 'dvc checkout preprocess' or rebuild it with 'dvc repro -f preprocess'"


@dataclass(frozen=True)
class Split:
    images: torch.Tensor | MappedImages  # uint8, N×C×H×W: in memory, or mapped from a stored split
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> Split:
        """The images at `indices`; a mapped split stays mapped (nothing is read yet)."""
        if isinstance(self.images, MappedImages):
            return Split(self.images.subset(indices), self.labels[indices])
        return Split(self.images[indices], self.labels[indices])

    def in_memory(self) -> Split:
        if isinstance(self.images, MappedImages):
            return Split(self.images.load(), self.labels)
        return self


@dataclass(frozen=True)
class Meta:
    """What later stages need to know about the processed data."""

    dataset: str
    classes: list[str]
    image_shape: list[int]
    mean: list[float]
    std: list[float]
    sizes: dict[str, int]
    class_counts: dict[str, int] = field(default_factory=dict)  # training split; absent in older files

    def save(self, path: Path) -> None:
        with atomic_path(path) as temp:
            temp.write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Meta:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise UserError(
                f"{path} is missing; run the preprocess stage first (dvc repro preprocess)"
            ) from None
        except (OSError, ValueError, TypeError) as error:  # unreadable, not JSON, or other keys
            raise UserError(f"{path} is damaged ({one_line(error)}); {_REBUILD}") from None


def validate(split: Split, spec: DatasetSpec, name: str) -> None:
    """Check shapes, dtypes, label range and that every class is present; raise UserError naming the problem."""
    if len(split.images) != len(split.labels):
        raise UserError(f"{name} split: {len(split.images)} images but {len(split.labels)} labels")
    if tuple(split.images.shape[1:]) != tuple(spec.image_shape):
        raise UserError(
            f"{name} split: images are {tuple(split.images.shape[1:])}, expected {spec.image_shape}"
        )
    if split.images.dtype != torch.uint8:
        raise UserError(f"{name} split: images are {split.images.dtype}, expected uint8")
    num_classes = len(spec.classes)
    if len(split) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
        bad = split.labels[(split.labels < 0) | (split.labels >= num_classes)][0].item()
        raise UserError(
            f"{name} split: label {bad} is out of range; {spec.name} has classes 0..{num_classes - 1}"
        )
    counts = torch.bincount(split.labels, minlength=num_classes)
    if (counts == 0).any():
        missing = [spec.classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        raise UserError(f"{name} split: no images of class {', '.join(missing)}")


# `auto` split sizes: a share of the images, capped where more images would add little precision (the standard
# error of an accuracy measured on 5,000 images is under 0.4 points).
AUTO_SPLITS = {"val_size": (0.1, 5_000), "test_size": (0.2, 10_000)}


def split_size(key: str, value: float | str, total: int) -> int:
    """`preprocess.<key>` (val_size or test_size) as a count of images out of `total`: a fraction below 1 of
    it, the count itself, or for `auto` a share of it (AUTO_SPLITS)."""
    if value == "auto":
        share, cap = AUTO_SPLITS[key]
        return min(round(share * total), cap)
    return round(value * total) if 0 < value < 1 else int(value)


def stratified_indices(
    labels: torch.Tensor, size: int, seed: int, min_per_class: int = 0, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (rest, chosen) with `size` chosen, every class in proportion to its count.

    Each class gives the first of its images in `order` (a permutation of the indices; by default a random one
    drawn from `seed`): a folder passes its images ranked by a hash of their paths (stable_shards.py), so an
    image's split does not change when others are added. With `min_per_class`, a class that would get fewer gets
    that many, as long as it keeps at least one image in the rest: a tiny class still shows up in validation and
    test. `chosen` may then exceed `size`."""
    if size > len(labels):
        raise UserError(f"cannot take {size} images from a split of {len(labels)}")
    if order is None:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    counts = torch.bincount(labels)
    # Largest-remainder rounding so the per-class shares add up to exactly `size`.
    exact = counts.double() * size / len(labels)
    take = exact.floor().long()
    remainder = size - int(take.sum())
    take[torch.argsort(exact - take, descending=True, stable=True)[:remainder]] += 1
    if size and min_per_class:
        take = torch.maximum(take, torch.minimum(torch.full_like(take, min_per_class), counts - 1))
    chosen = torch.cat([order[labels[order] == c][: int(take[c])] for c in range(len(counts))])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[chosen] = True
    return torch.nonzero(~mask).flatten(), chosen.sort().values


def channel_stats(images: torch.Tensor | MappedImages) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, on the 0..1 scale.

    Counted from a 256-bin histogram per channel: exact, and far cheaper than converting every pixel to float.
    The histograms add up a bounded chunk of images at a time, so a mapped split of any size streams through.
    """
    histograms = torch.zeros(images.shape[1], 256, dtype=torch.int64)
    step = max(1, CHUNK_BYTES // max(1, int(np.prod(images.shape[1:]))))
    for start in range(0, len(images), step):
        chunk = images[start : start + step]
        for channel in range(images.shape[1]):
            histograms[channel] += torch.bincount(chunk[:, channel].flatten(), minlength=256)
        if isinstance(images, MappedImages):
            images.release()
    return stats_from_histograms(histograms)


def stats_from_histograms(histograms: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (0..1 scale) from C×256 counts of uint8 values."""
    means, stds = [], []
    values = torch.arange(256, dtype=torch.float64) / 255
    for counts in histograms.double():
        total = counts.sum()
        mean = (counts * values).sum() / total
        variance = (counts * (values - mean) ** 2).sum() / (total - 1)  # unbiased, as Tensor.std
        means.append(mean.item())
        stds.append(variance.sqrt().item())
    return means, stds


# A shard of at most this many bytes when the caller does not say (preprocess.shard_mb in params.yaml).
DEFAULT_SHARD_BYTES = 256 * 10**6


def save_split(split: Split, folder: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    write_split(split.images, split.labels, folder, shard_bytes)


def load_split(folder: Path) -> Split:
    """A stored split, its images mapped from disk (read on demand), its labels in memory."""
    if not Path(folder).is_dir():
        raise UserError(f"{folder} is missing; run the preprocess stage first (dvc repro preprocess)")
    try:
        return Split(*read_split(folder))
    except (OSError, ValueError, EOFError) as error:  # truncated, refused pickle, wrong dtype, shards missing
        raise UserError(f"{folder} cannot be loaded: {one_line(error)}; {_REBUILD}") from None


def hold_out(
    labels: torch.Tensor,
    key: str,
    size: float | str,
    seed: int,
    classes: list[str],
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out) for `preprocess.<key>` = `size` (a count, a fraction or auto), stratified, with
    at least one image of every class that has two or more (see stratified_indices for `order`)."""
    count = split_size(key, size, len(labels))
    if count >= len(labels):
        raise UserError(
            f"preprocess.{key} = {size} leaves no training images (training set has {len(labels)})"
        )
    kept, held_out = stratified_indices(labels, count, seed, 1 if count else 0, order)
    if count:
        missing = set(range(len(classes))) - set(labels[held_out].tolist())
        if missing:
            names = ", ".join(classes[i] for i in sorted(missing))
            what = "validation" if key == "val_size" else "test"
            print(
                f"warning: class {names} has too few images to split (1 left): the {what} set has none of it",
                file=sys.stderr,
            )
    return kept, held_out
