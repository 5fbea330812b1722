"""The raw files of the table data sets (datasets.yaml) read into validated Splits: IDX (the MNIST family) and
CIFAR's binary batches, as fetch leaves them in data/raw."""

from pathlib import Path

import numpy as np
import torch

from image_classifier.data import Split, validate
from image_classifier.datasets import (
    CIFAR_META,
    CIFAR_RECORD_BYTES,
    CIFAR_SHAPE,
    CIFAR_TEST_BATCH,
    CIFAR_TRAIN_BATCHES,
    DatasetSpec,
)
from image_classifier.errors import UserError

IDX_MAGIC = {"images": 2051, "labels": 2049}  # uint8 data with 3 and 1 dimensions


def decode(raw_dir: Path, spec: DatasetSpec) -> dict[str, Split]:
    """The train and test splits of a table data set, read from the files fetch left in `raw_dir`."""
    if spec.format == "idx":
        return decode_idx(raw_dir, spec)
    if spec.format == "cifar-binary":
        return decode_cifar(raw_dir, spec)
    raise UserError(f"data set {spec.name!r} has format {spec.format!r}, which this version cannot read")


def decode_idx(raw_dir: Path, spec: DatasetSpec) -> dict[str, Split]:
    """Read the train and test IDX files of `spec` from `raw_dir` into validated Splits."""
    splits = {}
    for split in ("train", "test"):
        images = _read_idx(raw_dir / spec.files[f"{split}_images"].name, "images")
        labels = _read_idx(raw_dir / spec.files[f"{split}_labels"].name, "labels")
        splits[split] = Split(images.unsqueeze(1).contiguous(), labels.long())
        validate(splits[split], spec, split)
    return splits


def _read_idx(path: Path, kind: str) -> torch.Tensor:
    """An IDX file's uint8 array: a 4-byte magic number (type and number of dimensions), one big-endian 4-byte
    size per dimension, then the data. Read with numpy, not torchvision's reader: torchvision takes a second to
    import and brings PIL, which the GPU benchmark's bare machine need not have."""
    _require_fetched(path)
    with path.open("rb") as file:
        header = file.read(4)
        if len(header) < 4:
            raise UserError(f"{path} is empty or truncated ({len(header)} bytes); delete it and fetch again")
        magic = int.from_bytes(header, "big")
        if magic != IDX_MAGIC[kind]:
            raise UserError(
                f"{path}: IDX magic number {magic} is wrong; expected {IDX_MAGIC[kind]} for {kind}"
            )
        sizes = file.read(4 * (magic & 0xFF))
    shape = [int.from_bytes(sizes[i : i + 4], "big") for i in range(0, len(sizes), 4)]
    data = np.fromfile(path, dtype=np.uint8, offset=4 + len(sizes))
    if len(sizes) < 4 * (magic & 0xFF) or len(data) != np.prod(shape):
        raise UserError(
            f"{path}: not a valid IDX {kind} file: its {path.stat().st_size} bytes do not match its header; "
            "delete it and fetch again"
        )
    return torch.from_numpy(data.reshape(shape))


def _require_fetched(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path} is missing; run the fetch stage first (dvc repro fetch)")


def decode_cifar(raw_dir: Path, spec: DatasetSpec) -> dict[str, Split]:
    """Read CIFAR-10's binary batches (extracted by fetch into `raw_dir`) into validated Splits."""
    _check_cifar_classes(raw_dir / CIFAR_META, spec)
    splits = {}
    for split, members in (("train", CIFAR_TRAIN_BATCHES), ("test", (CIFAR_TEST_BATCH,))):
        records = np.concatenate([_read_cifar_batch(raw_dir / member) for member in members])
        # Label byte, then the 1024 red, 1024 green and 1024 blue pixels of the image, row by row.
        images = torch.from_numpy(records[:, 1:].reshape(-1, *CIFAR_SHAPE).copy())
        splits[split] = Split(images, torch.from_numpy(records[:, 0].astype(np.int64)))
        validate(splits[split], spec, split)
    return splits


def _read_cifar_batch(path: Path) -> np.ndarray:
    """A batch file's records as a uint8 array of shape (records, 3073)."""
    _require_fetched(path)
    data = np.fromfile(path, dtype=np.uint8)
    if len(data) == 0 or len(data) % CIFAR_RECORD_BYTES:
        raise UserError(
            f"{path}: not a CIFAR binary batch: {len(data)} bytes is not a whole number of "
            f"{CIFAR_RECORD_BYTES}-byte records; delete it and fetch again"
        )
    return data.reshape(-1, CIFAR_RECORD_BYTES)


def _check_cifar_classes(path: Path, spec: DatasetSpec) -> None:
    """The archive's own class list must be the spec's, in order: labels are indices into it."""
    _require_fetched(path)
    names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if names != list(spec.classes):
        raise UserError(
            f"{path} lists classes {', '.join(names)}; {spec.name} declares {', '.join(spec.classes)}"
        )
