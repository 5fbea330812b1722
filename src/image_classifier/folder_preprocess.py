"""preprocess for a folder data set, written once: the splits are drawn from the manifest (paths and labels)
before anything is decoded, and each image is decoded straight into its final shard.

No scratch copy of the data set, and no shard held in this process: worker processes decode each image into its
place in its shard file and count the training split's pixel values as they go (decoding.fill_shards); a file
that cannot be decoded is left out of its shard (that shard alone is rewritten; nothing else moves). Where
images go is stable_shards.py's job; how they are decoded is decoding.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from image_classifier.data import (
    Meta,
    hold_out,
    load_split,
    stats_from_histograms,
    stratified_indices,
)
from image_classifier.decoding import fill_shards
from image_classifier.errors import UserError
from image_classifier.files import atomic_dir
from image_classifier.folder import read_manifest, sort_classes, warn_undecodable
from image_classifier.preprocess import summarise
from image_classifier.stable_shards import (
    INDEX_FILE,
    hash_rank_order,
    plan_shards,
    previous_layout,
    write_index,
)
from image_classifier.storage import (
    LABELS_FILE,
    images_per_shard,
    remove_stale,
    shard_name,
    write_array,
)

if TYPE_CHECKING:
    from image_classifier.params import PreprocessParams
    from image_classifier.storage import MappedImages

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Stored:
    """What one split's folder holds so far."""

    folder: Path
    names: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    shards: list[int] = field(default_factory=list)


def preprocess_folder(
    raw_dir: Path,
    image_size: int,
    channels: int | Literal["auto"],
    params: PreprocessParams,
    split_dirs: dict[str, Path],
    meta_file: Path,
    samples_png: Path,
    note: Callable[[MappedImages], str] = lambda images: "",
    workers: int | None = None,
) -> Meta:
    """Decode the folder fetch copied into `raw_dir` into stored splits (train, val and test) of uint8
    `channels`×image_size×image_size shards; write meta.json and the preview. `note(train images)` is added to
    the summary line. Unreadable images are named on stderr and left out."""
    rows = read_manifest(raw_dir)
    classes = sort_classes({row["label"] for row in rows})
    layouts = {split: previous_layout(split_dirs[split], params.seed) for split in SPLIT_NAMES}
    members = draw_splits(rows, classes, params, {split: set(layouts[split] or ()) for split in SPLIT_NAMES})
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[row["label"]] for row in rows]
    names = [row["filename"] for row in rows]
    depth = 1 if channels == 1 else 3
    per_shard = images_per_shard((depth, image_size, image_size), round(params.shard_mb * 10**6))
    plans = {
        split: plan_shards([names[i] for i in members[split]], per_shard, layouts[split])
        for split in SPLIT_NAMES
    }
    histograms = np.zeros((depth, 256), np.int64)
    with ExitStack() as stack:
        stored = {}
        for split in SPLIT_NAMES:
            remove_stale(split_dirs[split])
            stored[split] = Stored(stack.enter_context(atomic_dir(split_dirs[split])))
        shards = _planned_shards(plans, members)
        files = [
            (
                stored[split].folder / shard_name(number),
                [raw_dir / names[row] for row in shard_rows],
                split == "train",  # the training split's pixels give the normalisation statistics
            )
            for split, number, shard_rows in shards
        ]
        grey, failures = True, []
        filled_shards = fill_shards(files, channels, image_size, depth, workers)
        for (split, number, shard_rows), filled in zip(shards, filled_shards, strict=True):
            grey &= channels == "auto" and filled.grey
            failures += filled.errors
            if filled.histograms is not None:
                histograms += filled.histograms
            _record(stored[split], number, [shard_rows[i] for i in filled.kept], names, labels)
        warn_undecodable(failures, len(rows))
        _check_training(stored["train"], classes, raw_dir, failures, len(members["train_pool"]))
        for split in SPLIT_NAMES:
            _finish(stored[split], rows, params.seed, narrow=grey)
    mean, std = stats_from_histograms(torch.from_numpy(histograms[:1] if grey else histograms))
    splits = {split: load_split(split_dirs[split]) for split in SPLIT_NAMES}
    return summarise(
        "folder", classes, splits, (mean, std), meta_file, samples_png, note(splits["train"].images)
    )


def draw_splits(
    rows: list[dict[str, str]],
    classes: list[str],
    params: PreprocessParams,
    before: dict[str, set[str]] | None = None,
) -> dict[str, list[int]]:
    """Row numbers of each split, in manifest order: the user's test/ rows, or a share of the training rows held
    out for testing; then validation likewise (the user's val/ rows, or a share); then the optional training
    subset. Stratified by class (each class's share within one image of exact), each class giving its images in
    the order of a hash of their paths (stable_shards.py); with `before` (the filenames each split held last
    time), a class gives first the images the split held before, then new ones, and only then images another
    split held: adding images moves none."""
    before = before or {}
    seen = set().union(*before.values()) if before else set()
    index = {name: i for i, name in enumerate(classes)}
    pool = [i for i, row in enumerate(rows) if row["split"] == "train"]
    given = {split: [i for i, row in enumerate(rows) if row["split"] == split] for split in ("test", "val")}
    if not pool:
        raise UserError("the manifest lists no training images; run the fetch stage again")
    members = {"train_pool": pool}
    for key, size, split in (("test_size", params.test_size, "test"), ("val_size", params.val_size, "val")):
        if given[split]:  # the folder's own split, as it is
            members[split] = given[split]
            print(f"{split}: the folder's own {len(given[split])} images (preprocess.{key} is not used)")
            continue
        labels, order = _ranked(rows, pool, index, params.seed, before.get(split, set()), seen)
        kept, held = hold_out(labels, key, size, params.seed, classes, order)
        members[split], pool = [pool[i] for i in held.tolist()], [pool[i] for i in kept.tolist()]
    if params.train_subset:
        if params.train_subset > len(pool):
            raise UserError(
                f"preprocess.train_subset = {params.train_subset} is more than the {len(pool)} training images"
            )
        labels, order = _ranked(rows, pool, index, params.seed, before.get("train", set()), seen)
        _, keep = stratified_indices(labels, params.train_subset, params.seed, order=order)
        pool = [pool[i] for i in keep.tolist()]
    members["train"] = pool
    return members


def _ranked(
    rows: list[dict[str, str]],
    pool: list[int],
    index: dict[str, int],
    seed: int,
    mine: set[str],
    seen: set[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels of `pool`'s rows, and their order of choice: those in `mine` first, then those in no earlier
    split, then the rest, each group by hash."""
    names = [rows[i]["filename"] for i in pool]
    labels = torch.tensor([index[rows[i]["label"]] for i in pool], dtype=torch.int64)
    by_hash = hash_rank_order(names, seed)
    group = np.array([0 if name in mine else 1 if name not in seen else 2 for name in names])
    order = by_hash[np.argsort(group[by_hash], kind="stable")]
    return labels, torch.from_numpy(order)


def _planned_shards(
    plans: dict[str, list[list[int]]], members: dict[str, list[int]]
) -> list[tuple[str, int, list[int]]]:
    """(split, shard number, manifest rows) of every shard to write: the planned shards that hold images, and
    one empty shard for a split with none (it records the image shape)."""
    shards = [
        (split, number, [members[split][i] for i in shard])
        for split in SPLIT_NAMES
        for number, shard in enumerate(plans[split])
        if shard
    ]
    for split in SPLIT_NAMES:
        if not any(shard[0] == split for shard in shards):
            shards.append((split, 0, []))
    return shards


def _record(stored: Stored, number: int, rows: list[int], names: list[str], labels: list[int]) -> None:
    stored.names += [names[i] for i in rows]
    stored.labels += [labels[i] for i in rows]
    stored.shards += [number] * len(rows)


def _check_training(
    train: Stored, classes: list[str], raw_dir: Path, failures: list[str], listed: int
) -> None:
    if not train.labels:
        first = f"; the first: {failures[0]}" if failures else ""
        raise UserError(f"none of the {listed} training images in {raw_dir} can be decoded{first}")
    missing = sorted(set(range(len(classes))) - set(train.labels))
    if missing:
        named = ", ".join(classes[i] for i in missing)
        raise UserError(f"class {named} has no readable training images left in {raw_dir}")


def _finish(stored: Stored, rows: list[dict[str, str]], seed: int, narrow: bool) -> None:
    """The split's labels and layout; with channels "auto" on an all-grey folder, its shards cut to one channel
    (decoded as three until the last image showed every one was grey: one pass over this folder's shards)."""
    write_array(stored.folder / LABELS_FILE, np.array(stored.labels, dtype=np.int64))
    label_names = {row["filename"]: row["label"] for row in rows}
    write_index(
        stored.folder / INDEX_FILE, stored.names, [label_names[n] for n in stored.names], stored.shards, seed
    )
    if narrow:
        for shard in sorted(stored.folder.glob("images-*.npy")):
            write_array(shard, np.load(shard, allow_pickle=False)[:, :1])
