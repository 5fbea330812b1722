"""Decoding, validation, the stratified split and the stored format, on tiny IDX files the tests write."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, idx_bytes, write_idx_dataset

from image_classifier import params as params_module
from image_classifier.data import (
    Meta,
    Split,
    channel_stats,
    load_split,
    save_split,
    split_size,
    stratified_indices,
    validate,
)
from image_classifier.errors import UserError
from image_classifier.fetch import fetch_dataset
from image_classifier.preprocess import class_by_class, preprocess
from image_classifier.raw_formats import decode, decode_idx


@pytest.fixture
def raw_dir(tmp_path: Path, tiny_dataset) -> tuple[object, Path]:
    spec, source = tiny_dataset
    raw = tmp_path / "raw"
    fetch_dataset(spec, raw, [source], [])
    return spec, raw


def test_decode_gives_uint8_images_and_int64_labels(raw_dir) -> None:
    spec, raw = raw_dir
    splits = decode_idx(raw, spec)
    assert splits["train"].images.shape == (400, 1, 28, 28)
    assert splits["train"].images.dtype == torch.uint8
    assert splits["test"].labels.dtype == torch.int64
    assert splits["test"].labels.tolist()[:3] == [0, 1, 2]


def test_stratified_split_keeps_class_shares_and_is_seeded() -> None:
    labels = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    rest, chosen = stratified_indices(labels, 100, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [90, 10]
    assert len(rest) + len(chosen) == 1000
    assert not set(rest.tolist()) & set(chosen.tolist())
    assert torch.equal(chosen, stratified_indices(labels, 100, seed=0)[1])
    assert not torch.equal(chosen, stratified_indices(labels, 100, seed=1)[1])


def test_channel_stats_on_known_pixels() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    mean, std = channel_stats(images)
    assert mean == pytest.approx([0.5])
    assert std == pytest.approx([0.7071], abs=1e-4)


def test_preprocess_writes_splits_meta_and_preview(raw_dir, tmp_path: Path) -> None:
    spec, raw = raw_dir
    params = params_module.PreprocessParams(
        val_size=50, test_size=0.2, train_subset=200, seed=0, shard_mb=256
    )
    files = {name: tmp_path / "out" / name for name in ("train", "val", "test")}
    decoded = decode(raw, spec)
    meta = preprocess(
        spec.name,
        list(spec.classes),
        decoded,
        params,
        files,
        tmp_path / "out/meta.json",
        tmp_path / "samples.png",
    )
    assert meta.sizes == {"train": 200, "val": 50, "test": 100}
    assert Meta.load(tmp_path / "out/meta.json") == meta
    train = load_split(files["train"])
    assert torch.bincount(train.labels).tolist() == [20] * 10
    # Statistics come from the training split only.
    assert meta.mean == pytest.approx(channel_stats(train.images)[0])
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Stored as plain arrays: every file loads without unpickling anything.
    assert sorted(path.name for path in files["val"].iterdir()) == ["images-00000.npy", "labels.npy"]
    assert np.load(files["val"] / "images-00000.npy", allow_pickle=False).shape == (50, 1, 28, 28)


def test_save_and_load_split_round_trip(tmp_path: Path) -> None:
    split = Split(torch.randint(0, 255, (5, 1, 28, 28), dtype=torch.uint8), torch.arange(5))
    save_split(split, tmp_path / "s")
    loaded = load_split(tmp_path / "s")
    assert torch.equal(loaded.images[:], split.images) and torch.equal(loaded.labels, split.labels)


def test_same_split_saves_to_the_same_bytes(tmp_path: Path) -> None:
    # DVC keys every later stage on these bytes: a rerun of preprocess on the same data must not retrain.
    split = Split(torch.randint(0, 255, (5, 1, 28, 28), dtype=torch.uint8), torch.arange(5))
    save_split(split, tmp_path / "s", shard_bytes=2 * 28 * 28)

    def contents() -> dict[str, bytes]:
        return {path.name: path.read_bytes() for path in (tmp_path / "s").iterdir()}

    first = contents()
    assert len(first) == 4  # labels and three shards of two, two and one images
    save_split(split, tmp_path / "s", shard_bytes=2 * 28 * 28)
    assert contents() == first


def _replace(raw: Path, spec, role: str, data: bytes) -> None:
    (raw / spec.files[role].name).write_bytes(data)


@pytest.mark.parametrize(
    ("role", "data", "message"),
    [
        ("train_images", idx_bytes(torch.zeros(10, dtype=torch.uint8)), "IDX magic number 2049 is wrong"),
        ("train_labels", b"", "is empty or truncated"),
        ("train_labels", idx_bytes(torch.zeros(5, 28, 28, dtype=torch.uint8)), "magic number 2051 is wrong"),
        ("test_labels", idx_bytes(torch.arange(7, dtype=torch.uint8)), "100 images but 7 labels"),
        ("test_labels", idx_bytes(torch.full((100,), 12, dtype=torch.uint8)), "label 12 is out of range"),
        (
            "test_images",
            idx_bytes(torch.zeros(100, 28, 28, dtype=torch.uint8))[:5000],
            "not a valid IDX images",
        ),
    ],
)
def test_bad_files_give_clear_errors(raw_dir, role: str, data: bytes, message: str) -> None:
    spec, raw = raw_dir
    _replace(raw, spec, role, data)
    with pytest.raises(UserError, match=message):
        decode_idx(raw, spec)


def test_missing_class_is_reported(tmp_path: Path) -> None:
    spec = write_idx_dataset(tmp_path / "src", gz=False)
    split = Split(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(UserError, match="no images of class class4"):
        validate(split, spec, "train")
    assert CLASSES[4] == "class4"


def test_gz_round_trip_helper_matches_spec(tmp_path: Path) -> None:
    spec = write_idx_dataset(tmp_path)
    data = gzip.decompress((tmp_path / "train-labels-idx1-ubyte.gz").read_bytes())
    assert len(data) == spec.files["train_labels"].size


def test_preview_order_shows_every_class_first() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    assert class_by_class(labels).tolist() == [0, 3, 5, 1, 4, 2]


def folder_like(counts: list[int]) -> dict[str, Split]:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return {"train": Split(torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8), labels)}


def test_auto_splits_hold_every_class_and_name_one_too_small(tmp_path: Path, capsys) -> None:
    params = params_module.PreprocessParams(
        val_size="auto", test_size="auto", train_subset=0, seed=0, shard_mb=256
    )
    files = {name: tmp_path / name for name in ("train", "val", "test")}
    classes = ["many", "few", "single"]
    meta = preprocess(
        "folder", classes, folder_like([60, 6, 1]), params, files, tmp_path / "m.json", tmp_path / "s.png"
    )
    # 20% of 67 for testing, 10% of the rest for validation, at least one of each class that can spare one.
    assert meta.sizes == {"train": 49, "val": 5, "test": 13}
    assert torch.bincount(load_split(files["val"]).labels, minlength=3).tolist() == [4, 1, 0]
    assert torch.bincount(load_split(files["test"]).labels, minlength=3).tolist() == [12, 1, 0]
    out, err = capsys.readouterr()
    assert "warning: class single has too few images to split (1 left): the test set has none of it" in err
    assert "training images per class: many 44, few 4, single 1 (44:1 unbalanced: consider" in out


def test_auto_split_sizes_are_capped_for_large_sets() -> None:
    assert split_size("val_size", "auto", 55_000) == 5_000
    assert split_size("test_size", "auto", 1_000_000) == 10_000
    assert split_size("val_size", "auto", 144) == 14
    assert split_size("val_size", 0.5, 144) == 72 and split_size("val_size", 30, 144) == 30
