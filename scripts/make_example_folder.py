"""Write a small image-folder data set of real images: Fashion-MNIST test images as PNGs, <dest>/<class>/<n>.png.

    python scripts/make_example_folder.py                      # 300 images into data/images
    python scripts/make_example_folder.py --dest /tmp/shoes --count 1000

<n> is the image's index in the Fashion-MNIST test set, so every file can be traced back to the original. Classes
get equal shares, taken in test-set order. The original files are read from --source folders (plain or .gz IDX,
checked against the pinned checksums), by default data/raw and Debian's dataset-fashion-mnist package.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dest", type=Path, default=Path("data/images"), help="folder (default: %(default)s)"
    )
    parser.add_argument("--count", type=int, default=300, help="images in all (default: %(default)s)")
    parser.add_argument("--source", type=Path, action="append", help="folder with the IDX files (repeatable)")
    args = parser.parse_args(argv)
    spec = get_dataset("fashion-mnist")
    if not len(spec.classes) * 2 <= args.count <= 10_000:
        raise UserError(f"--count {args.count}: give 20 to 10000 images (at least 2 per class)")
    names = [folder_name(name) for name in spec.classes]
    existing = [name for name in names if (args.dest / name).exists()]
    if existing:
        raise UserError(f"{args.dest / existing[0]} already exists; delete the old class folders first")

    sources = args.source or DEFAULT_SOURCES
    images = read_idx(spec.files["test_images"].name, spec.files["test_images"].sha256, sources)
    labels = read_idx(spec.files["test_labels"].name, spec.files["test_labels"].sha256, sources)
    quota = [args.count // len(names) + (i < args.count % len(names)) for i in range(len(names))]
    args.dest.mkdir(parents=True, exist_ok=True)
    # Written into a scratch folder first, so an interrupted run leaves no half-filled class folders behind.
    with tempfile.TemporaryDirectory(dir=args.dest, prefix=".example.") as scratch:
        for name in names:
            (Path(scratch) / name).mkdir()
        for index, label in enumerate(labels.tolist()):
            if quota[label]:
                quota[label] -= 1
                Image.fromarray(images[index]).save(Path(scratch) / names[label] / f"{index}.png")
        for name in names:
            shutil.move(Path(scratch) / name, args.dest / name)
    print(
        f"wrote {args.count} Fashion-MNIST test images as PNGs into {args.dest}/<class>/ ({len(names)} classes)"
    )


if __name__ == "__main__":
    run_cli(main)
