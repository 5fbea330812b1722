"""Write a small image-folder data set of real images as PNGs, <dest>/<class>/<n>.png: Fashion-MNIST test images,
or scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn).

    python scripts/make_example_folder.py                      # 300 images into data/images
    python scripts/make_example_folder.py --dest /tmp/shoes --count 1000
    python scripts/make_example_folder.py --dest /tmp/tiny --count 2000 --size 8 --test-share 0.2
    python scripts/make_example_folder.py --dest /tmp/digits --dataset digits --test-share 0.2

<n> is the image's index in its data set, so every file can be traced back to the original. Classes get equal
shares (digits: all 1,797 images), taken in data set order. --size resizes (Pillow, antialiased) to a
low-resolution set; --test-share writes <dest>/train/<class>/ and <dest>/test/<class>/, every class split at that
share. Fashion-MNIST's files are read from --source folders (plain or .gz IDX, checked against the pinned
checksums), by default data/raw and Debian's dataset-fashion-mnist package.
"""

import argparse
import gzip
import hashlib
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from image_classifier.datasets import get_dataset
from image_classifier.errors import UserError, run_cli

DEFAULT_SOURCES = [Path("data/raw"), Path("/usr/share/datasets/fashion-mnist")]


def folder_name(class_name: str) -> str:
    """A class name as a folder name on any file system: "T-shirt/top" becomes "T-shirt-top"."""
    return re.sub(r'[/\\:*?"<>|]+', "-", class_name).strip(" .") or "class"


def read_idx(name: str, sha256: str, sources: list[Path]) -> np.ndarray:
    """The IDX file `name` (or `name`.gz) from the first source folder that has it, checksum-verified."""
    for folder in sources:
        for path, opener in ((folder / name, open), (folder / f"{name}.gz", gzip.open)):
            if path.is_file():
                with opener(path, "rb") as file:
                    data = file.read()
                if hashlib.sha256(data).hexdigest() != sha256:
                    raise UserError(f"{path} is not the original Fashion-MNIST file (checksum differs)")
                dims = data[3]
                shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
                return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
    raise UserError(
        f"{name} is in none of {', '.join(map(str, sources))}; install Debian's dataset-fashion-mnist "
        "(make setup) or run 'dvc repro fetch' with data.dataset: fashion-mnist"
    )


def fashion_mnist(sources: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    spec = get_dataset("fashion-mnist")
    images = read_idx(spec.files["test_images"].name, spec.files["test_images"].sha256, sources)
    labels = read_idx(spec.files["test_labels"].name, spec.files["test_labels"].sha256, sources)
    return images, labels, list(spec.classes)


def digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's copy of the UCI optical digits: 8x8 images of 17 grey levels (0..16)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    return images, data.target.astype(np.int64), [str(digit) for digit in range(10)]


def chosen(labels: np.ndarray, count: int, classes: int) -> list[int]:
    """Indices of the first images of each class, in data set order, `count` in all in equal shares."""
    quota = [count // classes + (i < count % classes) for i in range(classes)]
    picked = []
    for index, label in enumerate(labels.tolist()):
        if quota[label]:
            quota[label] -= 1
            picked.append(index)
    return picked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dest", type=Path, default=Path("data/images"), help="folder (default: %(default)s)"
    )
    parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    parser.add_argument(
        "--count", type=int, default=300, help="images in all (default: %(default)s; digits: all)"
    )
    parser.add_argument(
        "--size", type=int, default=0, help="resize to this many pixels (default: as they are)"
    )
    parser.add_argument("--test-share", type=float, default=0.0, help="share of each class in a test/ folder")
    parser.add_argument("--source", type=Path, action="append", help="folder with the IDX files (repeatable)")
    args = parser.parse_args(argv)
    images, labels, classes = (
        digits() if args.dataset == "digits" else fashion_mnist(args.source or DEFAULT_SOURCES)
    )
    count = len(labels) if args.dataset == "digits" else args.count
    if not len(classes) * 2 <= count <= 10_000:
        raise UserError(f"--count {count}: give 20 to 10000 images (at least 2 per class)")
    if not 0 <= args.test_share < 1:
        raise UserError(f"--test-share {args.test_share}: give a share from 0 to below 1")
    names = [folder_name(name) for name in classes]
    tops = ["train", "test"] if args.test_share else names
    existing = [name for name in tops if (args.dest / name).exists()]
    if existing:
        raise UserError(f"{args.dest / existing[0]} already exists; delete the old class folders first")
    picked = chosen(labels, count, len(classes))
    args.dest.mkdir(parents=True, exist_ok=True)
    # Written into a scratch folder first, so an interrupted run leaves no half-filled class folders behind.
    with tempfile.TemporaryDirectory(dir=args.dest, prefix=".example.") as scratch:
        seen = [0] * len(classes)
        per_class = np.bincount(labels[picked], minlength=len(classes))
        for index in picked:
            label = int(labels[index])
            # The image that brings a class's test count up to the next whole share goes to test/.
            in_test = int((seen[label] + 1) * args.test_share) > int(seen[label] * args.test_share)
            seen[label] += 1
            folder = (
                Path(scratch) / (("test" if in_test else "train") if args.test_share else "") / names[label]
            )
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[index])
            if args.size:
                image = image.resize((args.size, args.size), Image.Resampling.BILINEAR, reducing_gap=None)
            image.save(folder / f"{index}.png")
        for name in tops:
            shutil.move(Path(scratch) / name, args.dest / name)
    print(
        f"wrote {count} {args.dataset} images ({', '.join(map(str, per_class))} per class) as PNGs into "
        f"{args.dest}/{'{train,test}/' if args.test_share else ''}<class>/"
    )


if __name__ == "__main__":
    run_cli(main)
