"""Real image folders for tests: coloured shapes on coloured backgrounds, in any mix of sizes, formats and modes.

    shapes_folder(tmp_path / "images")                                       3 classes × 60 RGB PNGs
    shapes_folder(root, per_class=[50, 5], classes=("circle", "star"))       unbalanced
    shapes_folder(root, classes=shape_classes(20), grey=1.0)                 20 classes, every file grey
    shapes_folder(root, formats=FORMATS, odd=len(VARIANTS))                  every format, and CMYK, palette, ...

A class is a shape kind, drawn filled or (`<kind>-outline`) as an outline, at a random place, size and colour:
learnable from the shape alone, in grey as well as in colour, even after a non-square image is squashed square.
"""

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FORMATS = ("png", "jpg", "webp", "bmp", "tiff", "gif")
KINDS = ("circle", "square", "triangle", "diamond", "star", "plus", "x", "pentagon", "arrow", "tee")
# How `save` can write a file besides plain RGB, and the suffix shapes_folder gives each.
VARIANTS = {"cmyk": "jpg", "palette": "png", "rgba": "png", "la": "png", "exif": "jpg", "16bit": "png"}
EXIF_ORIENTATION = 0x0112
ROTATED_90_CW = 6  # Orientation 6: a viewer turns the stored pixels 90° clockwise to show them


@dataclass(frozen=True)
class Shape:
    mask: Image.Image  # "L", 255 on the shape
    background: tuple[int, int, int]
    ink: tuple[int, int, int]

    def rgb(self) -> Image.Image:
        image = Image.new("RGB", self.mask.size, self.background)
        image.paste(self.ink, mask=self.mask)
        return image


def shape_classes(count: int) -> tuple[str, ...]:
    """`count` (up to 20) class names: every kind filled, then every kind as an outline."""
    names = KINDS + tuple(f"{kind}-outline" for kind in KINDS)
    assert count <= len(names), f"at most {len(names)} shape classes"
    return names[:count]


def shapes_folder(
    root: Path,
    per_class: int | Sequence[int] = 60,
    classes: Sequence[str] = ("circle", "square", "triangle"),
    size_range: tuple[int, int] = (24, 96),
    seed: int = 0,
    grey: float = 0.0,
    formats: Sequence[str] = ("png",),
    odd: int = 0,
) -> Path:
    """Write `root/<class>/<n>.<format>`: `per_class` images per class (or a count per class), each side drawn
    from `size_range` (so aspect ratios vary), formats taken in turn. A share `grey` of the files is saved grey;
    the first `odd` images of each class are saved as the VARIANTS in turn (CMYK, palette, ...)."""
    rng = random.Random(seed)
    counts = [per_class] * len(classes) if isinstance(per_class, int) else list(per_class)
    for name, count in zip(classes, counts, strict=True):
        for i in range(count):
            shape = draw_shape(name, (rng.randint(*size_range), rng.randint(*size_range)), rng)
            if i < odd:
                variant = list(VARIANTS)[i % len(VARIANTS)]
                save(shape, root / name / f"{i}.{VARIANTS[variant]}", variant)
            else:
                variant = "grey" if rng.random() < grey else "plain"
                save(shape, root / name / f"{i}.{formats[i % len(formats)]}", variant)
    return root


def draw_shape(name: str, size: tuple[int, int], rng: random.Random) -> Shape:
    """Shape `name` (a kind, or `<kind>-outline`) filling 45-80% of the image's shorter side, at a random place."""
    kind, outline = name.removesuffix("-outline"), name.endswith("-outline")
    width, height = size
    radius = rng.uniform(0.45, 0.8) * min(size) / 2
    centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    points = [(centre[0] + radius * x, centre[1] + radius * y) for x, y in _unit_shape(kind)]
    mask = Image.new("L", size, 0)
    if outline:
        ImageDraw.Draw(mask).polygon(points, outline=255, width=max(2, round(radius / 5)))
    else:
        ImageDraw.Draw(mask).polygon(points, fill=255)
    background, ink = _contrasting_colours(rng)
    return Shape(mask, background, ink)


def save(shape: Shape, path: Path, variant: str = "plain") -> Path:
    """Write `shape` to `path` (format from the suffix) as plain RGB, grey, or one of VARIANTS. However it is
    stored, a correct reader shows `shape.rgb()` (or its grey), with transparent parts white."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = shape.rgb()
    if variant == "grey":
        rgb.convert("L").save(path)
    elif variant == "cmyk":
        rgb.convert("CMYK").save(path)
    elif variant == "palette":  # index 0 (the background) transparent
        image = Image.new("P", rgb.size, 0)
        image.putpalette([*shape.background, *shape.ink])
        image.paste(1, mask=shape.mask)
        image.save(path, transparency=0)
    elif variant in ("rgba", "la"):  # transparent background, its colour still stored under alpha 0
        image = rgb.convert("RGBA" if variant == "rgba" else "L")
        image.putalpha(shape.mask)
        image.save(path)
    elif variant == "exif":  # stored on its side; the EXIF tag turns it upright
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = ROTATED_90_CW
        rgb.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    elif variant == "16bit":  # grey, 16 bits per pixel
        Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(path)
    else:
        assert variant == "plain", f"unknown variant {variant}"
        rgb.save(path)
    return path


def _unit_shape(kind: str) -> list[tuple[float, float]]:
    """The outline of `kind` as points within the unit circle, y pointing down."""
    arm = 0.35
    plus = [(-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm)]
    plus += [(arm, 1), (-arm, 1), (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm)]
    star = [point for pair in zip(_ring(5, 1), _ring(5, 0.45, math.pi / 5), strict=True) for point in pair]
    shapes = {
        "circle": _ring(48, 1),
        "square": _ring(4, 1, math.pi / 4),
        "triangle": _ring(3, 1),
        "diamond": _ring(4, 1),
        "star": star,
        "plus": plus,
        "x": [(0.7 * (x - y), 0.7 * (x + y)) for x, y in plus],  # the plus turned 45°
        "pentagon": _ring(5, 1),
        "arrow": [(0, -1), (0.8, -0.1), (0.3, -0.1), (0.3, 1), (-0.3, 1), (-0.3, -0.1), (-0.8, -0.1)],
        "tee": [
            (-1, -0.9),
            (1, -0.9),
            (1, -0.4),
            (0.25, -0.4),
            (0.25, 1),
            (-0.25, 1),
            (-0.25, -0.4),
            (-1, -0.4),
        ],
    }
    return shapes[kind]


def _ring(corners: int, radius: float, turn: float = 0.0) -> list[tuple[float, float]]:
    """A regular polygon's corners, the first straight up (then turned by `turn` radians)."""
    angles = (turn - math.pi / 2 + 2 * math.pi * k / corners for k in range(corners))
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _contrasting_colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A background and an ink colour whose greys differ by at least 80, so a grey copy keeps the shape."""
    while True:
        background, ink = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
        if abs(_grey(background) - _grey(ink)) >= 80:
            return background, ink


def _grey(colour: tuple[int, ...]) -> float:
    red, green, blue = colour
    return 0.299 * red + 0.587 * green + 0.114 * blue
