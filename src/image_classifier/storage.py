"""The stored split format: a folder per split of uint8 image shards and one label file, mapped from disk.

    data/processed/<split>/labels.npy           int64, one label per image
    data/processed/<split>/images-00000.npy     uint8 N×C×H×W, at most `preprocess.shard_mb` each
    data/processed/<split>/images-00001.npy     ...

Plain `.npy` files (numpy's format: a short text header, then the raw array), not WebDataset tar shards:
training reads images in any index order (the same shuffled order as in memory, so a streamed run's weights
are bit-identical to an in-memory run's), which a memory-mapped array gives with one gather and a tar stream
does not; they need no new dependency; and they load with `numpy.load(allow_pickle=False)`, so opening a
teammate's file never unpickles code. Shards of bounded size let DVC push and pull a few large files instead
of one per image or one giant file.

A split is written into a hidden folder beside its final name and renamed into place once complete, so a killed
preprocess never leaves a partial shard under an output's name.
"""

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from image_classifier.files import atomic_dir

LABELS_FILE = "labels.npy"
SHARD_GLOB = "images-*.npy"
# Statistics and copies go through at most this many bytes of images at a time: memory stays bounded.
CHUNK_BYTES = 64 * 2**20


def shard_name(number: int) -> str:
    return f"images-{number:05d}.npy"


def images_per_shard(image_shape: Sequence[int], shard_bytes: int) -> int:
    """How many images of `image_shape` (C, H, W) fit in a shard of `shard_bytes` (at least one)."""
    return max(1, shard_bytes // math.prod(image_shape))


def write_array(path: Path, array: np.ndarray) -> None:
    """One `.npy` file, written without pickling (the same array always gives the same bytes)."""
    with Path(path).open("wb") as file:
        np.lib.format.write_array(file, np.ascontiguousarray(array), allow_pickle=False)


def write_split(images: Any, labels: torch.Tensor, folder: Path, shard_bytes: int) -> None:
    """Store uint8 `images` (a tensor, or MappedImages: anything sliced into uint8 tensors) and int64 `labels` in
    `folder`, `shard_bytes` at most per image shard; memory holds one shard at a time. An empty split still
    gets one (empty) shard: it records the image shape."""
    per_shard = images_per_shard(images.shape[1:], shard_bytes)
    remove_stale(folder)
    with atomic_dir(folder) as temp:
        write_array(temp / LABELS_FILE, labels.numpy().astype(np.int64))
        for number, start in enumerate(range(0, max(len(labels), 1), per_shard)):
            write_array(temp / shard_name(number), _numpy(images[start : start + per_shard]))
            release = getattr(images, "release", None)
            if release:  # drop the pages this shard read from a mapped source
                release()


def remove_stale(folder: Path) -> None:
    """Remove the hidden temporary folders a killed run left beside `folder` (see files.atomic_dir)."""
    for stale in Path(folder).parent.glob(f".{Path(folder).name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def read_split(folder: Path) -> tuple["MappedImages", torch.Tensor]:
    """The mapped images and the labels of a split `folder`; ValueError or OSError saying what is wrong."""
    folder = Path(folder)
    labels = np.load(folder / LABELS_FILE, allow_pickle=False)
    if labels.dtype != np.int64 or labels.ndim != 1:
        raise ValueError(f"{LABELS_FILE} holds {labels.dtype} of shape {labels.shape}, not int64 labels")
    images = MappedImages(Shards(sorted(folder.glob(SHARD_GLOB))))
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images in its shards but {len(labels)} labels")
    return images, torch.from_numpy(labels)


def _numpy(images: Any) -> np.ndarray:
    return images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)


def _map(path: Path) -> np.ndarray:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.dtype != np.uint8 or array.ndim != 4:
        raise ValueError(f"{path.name} holds {array.dtype} of shape {array.shape}, not uint8 N×C×H×W images")
    return array


class Shards:
    """The image shards of one split (or of preprocess's scratch file), memory-mapped.

    Pages a mapping has read count in this process's resident memory until the mapping goes away, so
    `release` maps the files afresh: the old mappings close once no gather uses them, and the data stays in
    the OS page cache. Whoever reads calls it every so often, and memory stays bounded whatever the size."""

    def __init__(self, paths: list[Path]) -> None:
        if not paths:
            raise ValueError("no image shards (images-*.npy)")
        self.paths = paths
        self.arrays = [_map(path) for path in paths]
        shapes = {array.shape[1:] for array in self.arrays}
        if len(shapes) > 1:
            raise ValueError(f"shards of different image shapes {sorted(shapes)}")
        self.image_shape = shapes.pop()
        self.starts = np.cumsum([0] + [len(array) for array in self.arrays])

    def release(self) -> None:
        self.arrays = [np.load(path, mmap_mode="r", allow_pickle=False) for path in self.paths]

    def __len__(self) -> int:
        return int(self.starts[-1])


class MappedImages:
    """uint8 N×C×H×W images read from mapped shards on demand, through an optional index (a subset).

    Indexed like a uint8 tensor on the CPU (an int, a slice, or an index array gives a tensor), so code that
    slices a split's images in batches reads a mapped split without holding it in memory."""

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, shards: Shards, index: np.ndarray | None = None) -> None:
        self.shards, self.index = shards, index

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), *self.shards.image_shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return len(self.shards) if self.index is None else len(self.index)

    def subset(self, indices: torch.Tensor | np.ndarray) -> "MappedImages":
        """These images at `indices`, not read yet."""
        positions = np.asarray(indices, dtype=np.int64)
        return MappedImages(self.shards, positions if self.index is None else self.index[positions])

    def gather(self, positions: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The images at `positions`, in that order, copied into `out` (or a new array)."""
        rows = np.asarray(positions, dtype=np.int64)
        rows = rows if self.index is None else self.index[rows]
        if out is None:
            out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        shard_of = np.searchsorted(self.shards.starts, rows, side="right") - 1
        for shard in np.unique(shard_of):
            where = shard_of == shard
            local = rows[where] - self.shards.starts[shard]
            out[where] = self.shards.arrays[shard][local]
        return out

    def __getitem__(self, key: int | slice | torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(key, slice):
            return torch.from_numpy(self.gather(np.arange(len(self))[key]))
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            return torch.from_numpy(self.gather(np.array([int(key) % len(self)])))[0]
        return torch.from_numpy(self.gather(np.asarray(key)))

    def load(self) -> torch.Tensor:
        """All of them, in memory."""
        out = np.empty(self.shape, dtype=np.uint8)
        step = max(1, CHUNK_BYTES // max(1, math.prod(self.shape[1:])))
        for start in range(0, len(self), step):
            self.gather(np.arange(start, min(start + step, len(self))), out[start : start + step])
            self.release()
        return torch.from_numpy(out)

    def release(self) -> None:
        self.shards.release()
