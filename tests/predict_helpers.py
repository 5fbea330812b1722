"""Helpers of the batch-prediction tests (issue 26): a folder tree of mixed images, and reading predict's CSV."""

import csv
from pathlib import Path

import numpy as np
from PIL import Image

# Files no decoder can read, by name: each must get a row with an error, never be dropped.
UNREADABLE = {
    "broken/notes.png": b"shopping list\n",
    "broken/empty.bmp": b"",
    "broken/sub/cut.jpg": "truncated",
}


def write_mixed_tree(root: Path, count: int, seed: int = 0) -> list[str]:
    """`count` images (PNG, JPEG, BMP; grey and colour; sizes 12 to 80 pixels) in nested folders, plus the
    UNREADABLE files and one non-image file a folder search must skip. Returns the image paths, sorted."""
    rng = np.random.default_rng(seed)
    written = []
    for index in range(count):
        folder = root / f"batch{index % 4}" / ("nested" if index % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        height, width = (int(size) for size in rng.integers(12, 80, 2))
        grey = index % 2 == 0
        shape = (height, width) if grey else (height, width, 3)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        pixels[height // 3 : height // 2] = 230  # a bar, as the tiny data sets' classes have
        suffix = (".png", ".jpg", ".bmp")[index % 3]
        path = folder / f"image{index:04d}{suffix}"
        Image.fromarray(pixels).save(path)
        written.append(path)
    for name, content in UNREADABLE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "truncated":
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
            content = path.read_bytes()[:200]
        path.write_bytes(content)
        written.append(path)
    (root / "batch0" / "README.txt").write_text("not an image: skipped\n")
    return [str(path) for path in sorted(written)]  # folder by folder, as predict orders them


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))
