"""The preprocess stage's work for a table data set (decoded splits in memory): split off validation and test,
save the splits, and summarise them (meta.json, the preview grid, the printed lines; a folder data set's preprocess
writes the same summary)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from image_classifier.data import Meta, Split, channel_stats, hold_out, save_split, stratified_indices
from image_classifier.errors import UserError

if TYPE_CHECKING:  # annotations only: params.py needs pydantic, absent where the GPU benchmark runs
    from image_classifier.params import PreprocessParams


def preprocess(
    dataset: str,
    classes: list[str],
    decoded: dict[str, Split],
    params: PreprocessParams,
    split_dirs: dict[str, Path],
    meta_file: Path,
    samples_png: Path,
    note: str = "",
) -> Meta:
    """Split off validation (and test, when `decoded` has none), stratified and seeded; optionally subsample
    training; save the splits (shards of at most `params.shard_mb`), their statistics and a preview. `note` goes into the summary line after the
    image shape (how an "auto" setting was resolved)."""
    train = decoded["train"]
    splits = {}
    if "test" in decoded:
        splits["test"] = decoded["test"]
    else:
        rest, test_index = hold_out(train.labels, "test_size", params.test_size, params.seed, classes)
        train, splits["test"] = train.subset(rest), train.subset(test_index)
    rest, val_index = hold_out(train.labels, "val_size", params.val_size, params.seed, classes)
    splits = {"train": train.subset(rest), "val": train.subset(val_index), **splits}
    if params.train_subset:
        if params.train_subset > len(rest):
            raise UserError(
                f"preprocess.train_subset = {params.train_subset} is more than the {len(rest)} training images"
            )
        _, keep = stratified_indices(splits["train"].labels, params.train_subset, params.seed)
        splits["train"] = splits["train"].subset(keep)
    mean, std = channel_stats(splits["train"].images)  # training split only: val and test stay unseen
    for name, split in splits.items():
        save_split(split, split_dirs[name], round(params.shard_mb * 10**6))
    return summarise(dataset, classes, splits, (mean, std), meta_file, samples_png, note)


def summarise(
    dataset: str,
    classes: list[str],
    splits: dict[str, Split],
    stats: tuple[list[float], list[float]],
    meta_file: Path,
    samples_png: Path,
    note: str = "",
) -> Meta:
    """Write meta.json and the preview of the stored `splits`, and print the summary lines."""
    mean, std = stats
    train = splits["train"]
    meta = Meta(
        dataset=dataset,
        classes=list(classes),
        image_shape=list(train.images.shape[1:]),
        mean=mean,
        std=std,
        sizes={name: len(splits[name]) for name in ("train", "val", "test")},
        class_counts=dict(
            zip(classes, torch.bincount(splits["train"].labels, minlength=len(classes)).tolist(), strict=True)
        ),
    )
    meta.save(meta_file)
    from image_classifier.plots import save_image_grid  # matplotlib: only the stage that draws pays for it

    preview = splits["train"].subset(class_by_class(splits["train"].labels)[:36]).in_memory()
    save_image_grid(
        preview.images,
        [classes[i] for i in preview.labels],
        samples_png,
        title=f"{dataset}: training images\n{describe_counts(meta.class_counts, list_each=False)}",
    )
    print(
        f"{dataset}: "
        + ", ".join(f"{name} {size}" for name, size in meta.sizes.items())
        + f" images of {'×'.join(map(str, meta.image_shape))}{f' ({note})' if note else ''}"
        + f"; mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}"
    )
    print(f"training images per class: {describe_counts(meta.class_counts)}")
    return meta


def class_by_class(labels: torch.Tensor) -> torch.Tensor:
    """Indices that take the first image of each class, then the second of each, ...: a preview of the first
    few shows every class, not only the first one of a folder sorted by class."""
    by_class = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    first_of_class = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[by_class] = torch.arange(len(labels)) - first_of_class[labels[by_class]]
    return torch.argsort(rank * len(counts) + labels, stable=True)


# A largest-to-smallest class ratio above this gets the hint to weight the loss.
IMBALANCE_HINT_RATIO = 3


def describe_counts(counts: dict[str, int], list_each: bool = True) -> str:
    """`bag 120, coat 12 (10:1 unbalanced: consider train.class_weights: balanced)`, or a range when there are
    too many classes to list on a line (or `list_each` is off)."""
    values = list(counts.values())
    if list_each and len(counts) <= 10:
        text = ", ".join(f"{name} {count}" for name, count in counts.items())
    else:
        text = f"{len(counts)} classes, {min(values)} to {max(values)} each"
    ratio = max(values) / max(1, min(values))
    if ratio >= IMBALANCE_HINT_RATIO:
        text += f" ({ratio:.0f}:1 unbalanced: consider train.class_weights: balanced)"
    return text
