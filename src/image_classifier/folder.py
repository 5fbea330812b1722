"""A user's image folder as a data set: copied into data/raw by fetch, decoded and resized by preprocess.

The user's folder may be `<root>/<class>/<image>`, `<root>/train/<class>/...` + `<root>/test/<class>/...`, or a
CSV of `filename,label` rows. Whatever its layout, fetch leaves one normalised form in data/raw:

    data/raw/labels.csv      filename,label,split  (filename relative to data/raw; split train, val or test)
    data/raw/images/<path>   each image under its path relative to the user's folder (or the CSV's folder)

One manifest covers all three layouts and any label text (a CSV label may be a number or hold a "/", which no
folder name can), DVC versions exactly the files and labels a model was trained on, and messages name the user's
own file paths.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from image_classifier.errors import UserError, warn_each
from image_classifier.files import replace_dir

if TYPE_CHECKING:  # fetch only copies files: it starts without torch and torchvision
    import torch

    from image_classifier.data import Split

# What a folder data set counts as an image; anything else in the folder is skipped.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
MANIFEST = "labels.csv"
IMAGES_DIR = "images"
SPLITS = ("train", "val", "test")
# A folder's own validation split may go by any of these names (Ultralytics and torchvision lay data sets out with
# val/, Roboflow exports valid/); it is stored as the split "val".
VAL_FOLDERS = ("val", "valid", "validation")
MAX_NAMED = 10  # unreadable images named one by one on stderr; the rest are counted


@dataclass(frozen=True)
class Entry:
    source: Path  # the file to copy
    relative: PurePosixPath  # its place under data/raw/images
    label: str
    split: str


# --- fetch: find the images and copy them into data/raw --------------------------------------------------------


def copy_image_folder(source: Path, raw_dir: Path) -> None:
    """Copy the images of `source` (a folder or a CSV) into `raw_dir` in the normalised layout, replacing what
    was there only once every file is copied: any error leaves the old `raw_dir` as it was."""
    entries, skipped = find_images(source)
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=raw_dir.parent, prefix=f".{raw_dir.name}.", suffix=".tmp"))
    try:
        for entry in entries:
            target = temp / IMAGES_DIR / entry.relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(entry.source, target)
            except OSError as error:  # unreadable source, or data/ is full
                raise UserError(f"cannot copy {entry.source} into {raw_dir}: {error.strerror}") from None
        with (temp / MANIFEST).open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["filename", "label", "split"])
            writer.writerows((f"{IMAGES_DIR}/{e.relative}", e.label, e.split) for e in entries)
        replace_dir(temp, raw_dir)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    counts = Counter(entry.split for entry in entries)
    classes = {entry.label for entry in entries}
    notes = "; skipped " + ", ".join(f"{why}: {n}" for why, n in sorted(skipped.items())) if skipped else ""
    print(
        f"{source}: copied {len(entries)} images of {len(classes)} classes "
        f"({', '.join(f'{split} {counts[split]}' for split in SPLITS if counts[split])}) into {raw_dir}{notes}"
    )


def find_images(source: Path) -> tuple[list[Entry], Counter]:
    """Every image of `source` with its label and split, sorted; and counts of what was skipped, by reason."""
    if not source.exists() and not source.is_symlink():
        raise UserError(f"data.path {source} does not exist; point it at an image folder or a CSV")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise UserError(f"data.path {source} is a file but not a .csv of filename,label rows")
        entries, skipped, classes = _from_csv(source), Counter(), {}
    else:
        root = source.resolve()
        skipped = Counter()
        top = _subfolders(root, root, skipped)
        _skip_loose_files(root, root, skipped)
        if "train" in top:  # the user's own split
            found = _user_splits(source, top, root, skipped)
            entries = [entry for entries, _ in found.values() for entry in entries]
            classes = {
                f"{folder}/{name}": count
                for folder, (_, counts) in found.items()
                for name, count in counts.items()
            }
        else:
            entries, classes = _from_class_folders(top, root, "train", skipped)
    empty = [name for name, count in classes.items() if count == 0]
    if empty:
        raise UserError(f"{source}: class folder {empty[0]} has no images ({_named(empty)})")
    labels = sorted({entry.label for entry in entries})
    if len(labels) < 2:
        raise UserError(
            f"{source}: found {len(labels)} class{'es' if len(labels) != 1 else ''} "
            f"({', '.join(labels) or 'no images'}); a classifier needs at least 2"
        )
    return sorted(entries, key=lambda e: (e.split, str(e.relative))), skipped


def _user_splits(
    source: Path, top: dict[str, Path], root: Path, skipped: Counter
) -> dict[str, tuple[list[Entry], dict[str, int]]]:
    """The entries and class counts of each of the user's split folders, by folder name: train/, and optionally
    test/ and one validation folder (VAL_FOLDERS, stored as the split "val"), each holding the same classes."""
    extra = sorted(set(top) - {"train", "test", *VAL_FOLDERS})
    if extra:
        raise UserError(
            f"{source} has train/ beside {', '.join(extra)}/; use either <class> folders or train/, and optionally "
            "test/ and val/, folders of classes"
        )
    validation = sorted(set(top) & set(VAL_FOLDERS))
    if len(validation) > 1:
        raise UserError(
            f"{source} has {' and '.join(f'{name}/' for name in validation)}: keep one validation folder"
        )
    found = {}
    for folder, path in top.items():
        _skip_loose_files(path, root, skipped)
        split = "val" if folder in VAL_FOLDERS else folder
        found[folder] = _from_class_folders(_subfolders(path, root, skipped), root, split, skipped)
    for folder in sorted(set(found) - {"train"}):
        differ = sorted(set(found[folder][1]) ^ set(found["train"][1]))
        if differ:
            raise UserError(
                f"{source}: train/ and {folder}/ must hold the same class folders; only one has {', '.join(differ)}"
            )
    return found


def _from_class_folders(
    class_dirs: dict[str, Path], root: Path, split: str, skipped: Counter
) -> tuple[list[Entry], dict[str, int]]:
    """The images under each class folder, and each class's image count (0 for an empty one)."""
    entries, counts = [], {}
    for name, class_dir in class_dirs.items():
        before = len(entries)
        for directory, dirs, files in os.walk(class_dir):
            here = Path(directory)
            dirs[:] = sorted(_subfolders(here, root, skipped))  # hidden and symlinked folders are not walked
            for file in files:
                path = here / file
                if _is_image(path, root, skipped):
                    relative = PurePosixPath(path.relative_to(root).as_posix())
                    entries.append(Entry(path, relative, name, split))
        counts[name] = len(entries) - before
    return entries, counts


def _subfolders(folder: Path, root: Path, skipped: Counter) -> dict[str, Path]:
    """Visible, real subfolders of `folder` by name; hidden ones and symlinks to folders inside `root` are
    skipped (following them would count images twice); a symlink leading outside `root` is refused."""
    found = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir(follow_symlinks=True):
            continue
        if entry.name.startswith("."):
            skipped["hidden folders"] += 1
        elif entry.is_symlink():
            _check_link(Path(entry.path), root)
            skipped["symlinked folders"] += 1
        else:
            found[entry.name] = Path(entry.path)
    return found


def _skip_loose_files(folder: Path, root: Path, skipped: Counter) -> None:
    """Files beside the class folders belong to no class: counted, not copied (a README is fine there)."""
    for entry in os.scandir(folder):
        if not entry.is_dir(follow_symlinks=True):
            path = Path(entry.path)
            if _is_image(path, root, skipped):
                skipped["images outside a class folder"] += 1


def _is_image(path: Path, root: Path, skipped: Counter) -> bool:
    """True for a visible image file; counts hidden and other files as skipped."""
    if path.name.startswith("."):
        skipped["hidden files"] += 1
        return False
    if path.is_symlink():
        _check_link(path, root)
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        skipped["non-image files"] += 1
        return False
    return True


def _check_link(path: Path, root: Path) -> None:
    target = path.resolve()
    if not target.is_relative_to(root):
        raise UserError(f"{path} is a symlink to {target}, outside {root}; copy the file in instead")
    if not target.exists():
        raise UserError(f"{path} is a symlink to {target}, which does not exist")


def _from_csv(csv_path: Path) -> list[Entry]:
    """One entry per `filename,label` row; filenames are relative to the CSV's folder and must stay inside it."""
    base = csv_path.parent.resolve()
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as file:  # -sig: the BOM spreadsheets write
            reader = csv.DictReader(file)
            columns = [name.strip().lower() for name in reader.fieldnames or []]
            if "filename" not in columns or "label" not in columns:
                raise UserError(
                    f"{csv_path}: the header row must name the columns filename and label; found {columns}"
                )
            reader.fieldnames = columns
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError:
        raise UserError(f"{csv_path}: not a UTF-8 text file") from None
    entries, seen = [], {}
    for line, row in rows:
        name, label = (row.get("filename") or "").strip(), (row.get("label") or "").strip()
        where = f"{csv_path} row {line}"
        if not name or not label:
            raise UserError(f"{where}: needs both a filename and a label")
        relative = PurePosixPath(os.path.normpath(name).replace(os.sep, "/"))
        if relative.is_absolute() or relative.parts[0] == "..":
            raise UserError(f"{where}: {name} is outside the CSV's folder; give paths relative to {base}")
        path = base / relative
        if not path.resolve().is_relative_to(base):
            raise UserError(f"{where}: {name} is a symlink to {path.resolve()}, outside the CSV's folder")
        if not path.is_file():
            raise UserError(f"{where}: {name} does not exist in {base}")
        if relative.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{where}: {name} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if relative in seen:
            raise UserError(f"{where}: {name} is listed twice (row {seen[relative]} too)")
        seen[relative] = line
        entries.append(Entry(path, relative, label, "train"))
    return entries


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


# --- preprocess: decode what fetch copied ----------------------------------------------------------------------


def sort_classes(labels: set[str]) -> list[str]:
    """Class names in index order: numerically when every label is a whole number (2 before 10), else by text."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


# `data.image_size: auto` for our own networks: the images' own size (the median shorter side), never enlarged,
# at most MAX_AUTO_IMAGE_SIZE and at least MIN_IMAGE_SIZE. On a 180-image folder of shapes the convnet reached
# 0.998 test accuracy at 64 pixels against 0.96 at 32 (docs: what the defaults do); beyond 64 our small networks
# gain little for four times the cost per doubling. Enlarging 8-pixel images to 64 only adds cost: 64 times
# the pixels for nothing the images hold.
MAX_AUTO_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 8
# For timm models, the images' own size too, but at most the architecture's input size and at least this: their
# stems downsample 32 times, and 80 pixels are the smallest multiple of 16 that leaves a 3x3 map (64 leave 2x2).
# Fine-tuning ImageNet's EfficientNet-Lite0 on 1,000 Fashion-MNIST images (28 px, enlarged), 2-core AMD EPYC: test
# accuracy 0.8590 / 0.8675 / 0.8735 at 64 / 80 / 96 px in 46 / 62 / 82 s of training (seed 1: 0.8650 at 80,
# 0.8790 at 96); the whole `dvc exp run`, 0.8675 at 80 in 113 s, 0.8655 at 96 in 125 s; on 10,000 images 0.9325 at
# 80, 0.9335 at 96. 224 px (the weights' size) costs 5.4 times 96's per epoch (docs/benchmarks.md, fine-tuning).
MIN_TIMM_AUTO_IMAGE_SIZE = 80
# Image headers read to find the median size: enough for a stable median, cheap on a million-image folder.
SIZE_SAMPLE = 1_000


def resolve_image_size(image_size: int | Literal["auto"], model: str, raw_dir: Path | None = None) -> int:
    """`data.image_size` in pixels. "auto" is the median shorter side of the folder's images in `raw_dir` (read
    from the file headers of up to SIZE_SAMPLE of them), never enlarged beyond it but to a floor: within 8..64
    pixels for our own networks, within 80..the architecture's pretrained input size (224 for most) for timm's.
    (So preprocess in dvc.yaml lists train.model.)"""
    if image_size != "auto":
        return image_size
    from image_classifier import backbones

    timm = backbones.is_timm(model)
    low, high = (
        (MIN_TIMM_AUTO_IMAGE_SIZE, backbones.input_size(model))
        if timm
        else (MIN_IMAGE_SIZE, MAX_AUTO_IMAGE_SIZE)
    )
    median = median_shorter_side(raw_dir) if raw_dir is not None else 0
    return max(low, min(high, median)) if median else high


def median_shorter_side(raw_dir: Path) -> int:
    """The median shorter side, in pixels, of an evenly spaced sample of the images fetch copied into `raw_dir`
    (0 when none can be read). Only headers are read: Pillow's open does not decode the pixels."""
    from PIL import Image

    rows = read_manifest(raw_dir)
    step = max(1, len(rows) // SIZE_SAMPLE)
    sides = []
    for row in rows[::step]:
        try:
            with Image.open(raw_dir / row["filename"]) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, SyntaxError):  # unreadable: preprocess names it when decoding
            continue
    return sorted(sides)[len(sides) // 2] if sides else 0


def auto_note(image_size: int | str, channels: int | str, images: torch.Tensor, model: str = "") -> str:
    """What the "auto" settings became, for preprocess's summary line; "" when neither is "auto"."""
    from image_classifier.backbones import is_timm

    notes = []
    if image_size == "auto":
        low, high = (
            (MIN_TIMM_AUTO_IMAGE_SIZE, f"{model}'s input size")
            if is_timm(model)
            else (
                MIN_IMAGE_SIZE,
                MAX_AUTO_IMAGE_SIZE,
            )
        )
        why = f"the images' median shorter side, within {low}..{high}"
        notes.append(f"data.image_size auto: {images.shape[-1]} ({why})")
    if channels == "auto":
        why = "every image is grey" if images.shape[1] == 1 else "some images are in colour"
        notes.append(f"data.channels auto: {images.shape[1]}, {why}")
    return "; ".join(notes)


def read_manifest(raw_dir: Path) -> list[dict[str, str]]:
    """The rows (filename, label, split) of the manifest fetch wrote into `raw_dir`."""
    manifest = raw_dir / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{manifest} is missing; run the fetch stage first (dvc repro fetch)")
    with manifest.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def decode_folder(
    raw_dir: Path, image_size: int, channels: int | Literal["auto"], workers: int | None = None
) -> tuple[list[str], dict[str, Split]]:
    """Every image fetch copied into `raw_dir`, decoded in memory as uint8 `channels`×image_size×image_size
    (see decoding.py), in manifest order: the class names and the user's splits ("train", and "val" and "test"
    when the folder had them). For small folders and tests; preprocess writes shards instead (folder_preprocess.py).
    `channels` "auto" is 1 when every image is grey, else 3. Unreadable images are named on stderr, left out."""
    import torch

    from image_classifier.data import Split
    from image_classifier.decoding import decode_iter

    rows = read_manifest(raw_dir)
    classes = sort_classes({row["label"] for row in rows})
    decoded, failures = {}, []
    for i, pixels, error in decode_iter(
        [raw_dir / row["filename"] for row in rows], channels, image_size, workers
    ):
        if pixels is None:
            failures.append(error)
        else:
            decoded[i] = torch.from_numpy(pixels)
    warn_undecodable(failures, len(rows))
    depth = 1 if channels == 1 or (decoded and all(p.shape[0] == 1 for p in decoded.values())) else 3
    index = {name: i for i, name in enumerate(classes)}
    splits = {}
    for name in SPLITS:
        kept = [i for i in sorted(decoded) if rows[i]["split"] == name]
        if kept:
            images = torch.stack([decoded[i].expand(depth, -1, -1) for i in kept])
            splits[name] = Split(images, torch.tensor([index[rows[i]["label"]] for i in kept]))
    if "train" not in splits:
        first = f"; the first: {failures[0]}" if failures else ""
        raise UserError(f"none of the {len(rows)} training images in {raw_dir} can be decoded{first}")
    missing = [name for i, name in enumerate(classes) if i not in set(splits["train"].labels.tolist())]
    if missing:
        raise UserError(f"class {_named(missing)} has no readable training images left in {raw_dir}")
    return classes, splits


def warn_undecodable(failures: list[str], total: int) -> None:
    if not failures:
        return
    header = f"warning: skipped {len(failures)} of {total} images that cannot be decoded:"
    warn_each(header, failures, MAX_NAMED)
