"""Folder data sets (`data.dataset: folder`): fetch's copy into data/raw, preprocess's decoding, the image reader
predict shares with preprocess, and (slow) the whole pipeline on a folder of real Fashion-MNIST PNGs."""

import csv
import dataclasses
import importlib.util
import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FASHION_DIR, REPO, copy_repo, default_params, run, write_params
from image_folders import FORMATS, Shape, draw_shape, save, shapes_folder
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from image_classifier import folder, images
from image_classifier.errors import UserError
from image_classifier.folder import copy_image_folder, decode_folder, resolve_image_size, sort_classes
from image_classifier.images import decode_rgb_array, read_image

COLOURS = {"cat": (220, 30, 30), "dog": (30, 30, 220)}  # a class you can tell from the pixels


def image(path: Path, colour=(200, 40, 40), size=(20, 12), mode: str = "RGB") -> Path:
    """A small image file, its format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path)
    return path


def class_folders(root: Path, counts: dict[str, int], suffix: str = ".png") -> Path:
    for name, count in counts.items():
        for i in range(count):
            image(root / name / f"{i}{suffix}", COLOURS.get(name, (90, 200, 90)))
    return root


def manifest(raw: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((raw / "labels.csv").open()))


# --- Layouts ---------------------------------------------------------------------------------------------------


def test_class_folders_are_copied_decoded_and_what_is_not_an_image_is_skipped(tmp_path: Path, capsys) -> None:
    root = class_folders(tmp_path / "images", {"cat": 3, "dog": 2})
    image(root / "dog" / "more" / "nested.jpg", COLOURS["dog"])  # deeper folders belong to their class
    (root / "README.md").write_text("about these images\n")
    (root / "dog" / "notes.txt").write_text("not an image\n")
    image(root / "cat" / ".hidden.png")
    image(root / ".thumbnails" / "cat" / "0.png")
    image(root / "stray.png")  # beside the class folders: no class
    raw = tmp_path / "raw"

    copy_image_folder(root, raw)

    out = capsys.readouterr().out
    assert "copied 6 images of 2 classes (train 6)" in out
    assert out.rstrip().endswith(
        "; skipped hidden files: 1, hidden folders: 1, images outside a class folder: 1, non-image files: 2"
    )
    rows = manifest(raw)
    assert [(r["filename"], r["label"], r["split"]) for r in rows] == [
        ("images/cat/0.png", "cat", "train"),
        ("images/cat/1.png", "cat", "train"),
        ("images/cat/2.png", "cat", "train"),
        ("images/dog/0.png", "dog", "train"),
        ("images/dog/1.png", "dog", "train"),
        ("images/dog/more/nested.jpg", "dog", "train"),
    ]
    assert (raw / "images/cat/0.png").read_bytes() == (root / "cat/0.png").read_bytes()
    assert sorted(p.name for p in raw.iterdir()) == ["images", "labels.csv"]

    classes, splits = decode_folder(raw, 16, 3)
    assert classes == ["cat", "dog"] and set(splits) == {"train"}
    train = splits["train"]
    assert train.images.shape == (6, 3, 16, 16) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and train.labels.dtype == torch.int64
    red, blue = train.images[:, 0].float().mean((1, 2)), train.images[:, 2].float().mean((1, 2))
    assert ((red > blue) == (train.labels == 0)).all(), "each image decoded under its own label"


def test_the_users_own_train_test_split_is_kept(tmp_path: Path, capsys) -> None:
    root = tmp_path / "images"
    class_folders(root / "train", {"cat": 4, "dog": 3})
    class_folders(root / "test", {"cat": 2, "dog": 1})
    raw = tmp_path / "raw"
    copy_image_folder(root, raw)
    assert "copied 10 images of 2 classes (train 7, test 3)" in capsys.readouterr().out
    assert {r["filename"] for r in manifest(raw) if r["split"] == "test"} == {
        "images/test/cat/0.png",
        "images/test/cat/1.png",
        "images/test/dog/0.png",
    }
    classes, splits = decode_folder(raw, 8, 1)
    assert classes == ["cat", "dog"]
    assert splits["train"].images.shape == (7, 1, 8, 8) and splits["test"].labels.tolist() == [0, 0, 1]


def test_csv_layout_with_text_labels(tmp_path: Path) -> None:
    base = tmp_path / "shop"
    rows = [
        ("photos/a.png", "T-shirt/top"),
        ("photos/b.jpg", "Bag"),
        ("c.png", "Bag"),
        ("./photos/d.png", "Bag"),
    ]
    for name, label in rows:
        image(base / name, COLOURS["cat"] if label == "Bag" else COLOURS["dog"])
    csv_path = base / "labels.csv"
    csv_path.write_text("filename,label\n" + "".join(f"{name},{label}\n" for name, label in rows))
    raw = tmp_path / "raw"
    copy_image_folder(csv_path, raw)
    assert [(r["filename"], r["label"]) for r in manifest(raw)] == [
        ("images/c.png", "Bag"),
        ("images/photos/a.png", "T-shirt/top"),
        ("images/photos/b.jpg", "Bag"),
        ("images/photos/d.png", "Bag"),
    ]
    classes, splits = decode_folder(raw, 16, 3)
    assert classes == ["Bag", "T-shirt/top"]  # a label no folder name could hold
    assert splits["train"].labels.tolist() == [0, 1, 0, 0]


def test_csv_layout_with_numeric_labels_sorts_them_as_numbers(tmp_path: Path) -> None:
    labels = ["10", "2", "1", "2", "10"]
    for i in range(len(labels)):
        image(tmp_path / "digits" / f"{i}.png")
    (tmp_path / "labels.csv").write_text(
        "label,filename\n" + "".join(f"{label},digits/{i}.png\n" for i, label in enumerate(labels))
    )
    copy_image_folder(tmp_path / "labels.csv", tmp_path / "raw")
    classes, splits = decode_folder(tmp_path / "raw", 8, 1)
    assert classes == ["1", "2", "10"]
    assert [classes[i] for i in splits["train"].labels] == labels
    assert sort_classes({"b", "10", "a"}) == ["10", "a", "b"]  # text order once any label is not a number


# --- Decoding --------------------------------------------------------------------------------------------------


def test_corrupt_images_are_named_and_skipped(tmp_path: Path, capsys) -> None:
    root = class_folders(tmp_path / "images", {"cat": 3, "dog": 3})
    cut = image(root / "cat" / "cut.png", size=(64, 64))
    cut.write_bytes(cut.read_bytes()[:80])
    (root / "dog" / "text.jpg").write_text("a text file named like an image\n")
    for i in range(11):
        (root / "dog" / f"zz{i:02}.gif").write_bytes(b"GIF89a" + b"\x00" * 20)
    copy_image_folder(root, tmp_path / "raw")
    capsys.readouterr()

    _, splits = decode_folder(tmp_path / "raw", 16, 3)
    assert splits["train"].labels.tolist() == [0, 0, 0, 1, 1, 1]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "warning: skipped 13 of 19 images that cannot be decoded:"
    named = "\n".join(err[1:])
    assert "cat/cut.png: image data is corrupt or truncated" in named
    assert "dog/text.jpg: not an image file" in named
    assert len(err) == 1 + 10 + 1 and err[-1] == "  ... and 3 more"


def test_no_decodable_training_image_is_one_error(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(b"not a png")
    copy_image_folder(root, tmp_path / "raw")
    with pytest.raises(
        UserError, match=r"none of the 2 training images in .*raw can be decoded; the first: "
    ):
        decode_folder(tmp_path / "raw", 16, 3)


def test_a_class_whose_images_are_all_corrupt_is_refused(tmp_path: Path) -> None:
    root = class_folders(tmp_path / "images", {"cat": 2})
    (root / "dog").mkdir()
    (root / "dog" / "x.png").write_bytes(b"not a png")
    copy_image_folder(root, tmp_path / "raw")
    with pytest.raises(UserError, match=r"class dog has no readable training images left"):
        decode_folder(tmp_path / "raw", 16, 3)


def test_missing_manifest_says_run_fetch(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"labels.csv is missing; run the fetch stage first"):
        decode_folder(tmp_path / "raw", 16, 3)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif", ".webp", ".bmp"])
def test_grey_and_colour_files_become_the_channels_asked_for(tmp_path: Path, suffix: str) -> None:
    grey = image(tmp_path / f"grey{suffix}", (90, 90, 90), size=(40, 30), mode="L")
    colour = image(tmp_path / f"colour{suffix}", (255, 0, 0), size=(30, 40))

    as_rgb = read_image(grey, 3, (16, 16))
    assert as_rgb.shape == (3, 16, 16) and as_rgb.dtype == torch.uint8
    assert torch.equal(as_rgb[0], as_rgb[1]) and torch.equal(as_rgb[1], as_rgb[2])
    assert abs(as_rgb.float().mean() - 90) <= 3

    as_grey = read_image(colour, 1, (8, 12))
    assert as_grey.shape == (1, 8, 12)
    assert abs(as_grey.float().mean() - 0.299 * 255) <= 4  # luma of pure red, not its red channel


def test_downscaling_is_antialiased(tmp_path: Path) -> None:
    # One-pixel stripes, shrunk 7 times: plain bilinear samples land on single stripes (0 or 255), an
    # antialiased resize averages them to grey.
    stripes = torch.zeros(63, 63, dtype=torch.uint8)
    stripes[:, ::2] = 255
    Image.fromarray(stripes.numpy()).save(tmp_path / "stripes.png")
    small = read_image(tmp_path / "stripes.png", 1, (9, 9)).float()
    assert small.std() < 20 and 100 < small.mean() < 155


def test_predict_reads_an_image_exactly_as_preprocess_does(tmp_path: Path) -> None:
    root = tmp_path / "images"
    image(root / "cat" / "photo.jpg", COLOURS["cat"], size=(47, 31))
    (root / "dog").mkdir()
    Image.linear_gradient("L").resize((50, 70)).save(root / "dog" / "gradient.png")  # grey, detailed
    copy_image_folder(root, tmp_path / "raw")
    _, splits = decode_folder(tmp_path / "raw", 16, 3)
    for index, path in enumerate((root / "cat" / "photo.jpg", root / "dog" / "gradient.png")):
        assert torch.equal(read_image(path, 3, (16, 16)), splits["train"].images[index])


# --- Any image: formats, modes, EXIF rotation, transparency ------------------------------------------------------


def decode_rgb(path: Path) -> torch.Tensor:
    """decode_rgb_array's uint8 H×W×3 pixels at full size as 3×H×W, torchvision's layout."""
    return torch.from_numpy(decode_rgb_array(path).transpose(2, 0, 1).copy())


RED, TEAL = (220, 20, 30), (10, 120, 110)


def star(size: tuple[int, int] = (40, 64)) -> Shape:
    """A red star on teal, 40 wide and 64 high: a rotation that is missed or wrong changes the shape."""
    return dataclasses.replace(draw_shape("star", size, random.Random(0)), background=TEAL, ink=RED)


def on_white(shape: Shape) -> Image.Image:
    image = Image.new("RGB", shape.mask.size, "white")
    image.paste(shape.ink, mask=shape.mask)
    return image


SHOWN = {  # what a viewer shows for a file saved as a variant
    "colour": lambda shape: shape.rgb(),
    "grey": lambda shape: shape.rgb().convert("L"),
    "on white": on_white,
    "grey on white": lambda shape: on_white(shape).convert("L"),
}
LOSSY = 10  # mean error per pixel and channel JPEG and lossy WebP make of a small two-colour image (6 seen)
CASES = {  # id: variant, suffix, what a viewer shows, mean error allowed
    **{suffix: ("plain", suffix, "colour", LOSSY if suffix in ("jpg", "webp") else 0) for suffix in FORMATS},
    "grey-jpg": ("grey", "jpg", "grey", 1),
    "grey-gif": ("grey", "gif", "grey", 0),
    "cmyk-jpg": ("cmyk", "jpg", "colour", LOSSY),
    "cmyk-tiff": ("cmyk", "tiff", "colour", 0),
    "palette-png": ("palette", "png", "on white", 0),
    "palette-gif": ("palette", "gif", "on white", 0),
    "rgba-png": ("rgba", "png", "on white", 0),
    "rgba-webp": ("rgba", "webp", "on white", LOSSY),
    "rgba-tiff": ("rgba", "tiff", "on white", 0),
    "la-png": ("la", "png", "grey on white", 0),
    "exif-jpg": ("exif", "jpg", "colour", LOSSY),
    "exif-png": ("exif", "png", "colour", 0),
    "exif-webp": ("exif", "webp", "colour", LOSSY),
    "exif-tiff": ("exif", "tiff", "colour", 0),
    "16bit-png": ("16bit", "png", "grey", 0),
    "16bit-tiff": ("16bit", "tiff", "grey", 0),
}


@pytest.mark.parametrize(("variant", "suffix", "shown", "error"), CASES.values(), ids=CASES)
def test_every_format_and_mode_decodes_to_what_a_viewer_shows(
    tmp_path: Path, variant: str, suffix: str, shown: str, error: float
) -> None:
    shape = star()
    path = save(shape, tmp_path / f"star.{suffix}", variant)
    pixels = decode_rgb(path)
    expected = F.pil_to_tensor(SHOWN[shown](shape).convert("RGB"))
    assert pixels.shape == (3, 64, 40) and pixels.dtype == torch.uint8, "upright, 8-bit RGB"
    assert (pixels.float() - expected.float()).abs().mean() <= error


@pytest.mark.parametrize("suffix", ["png", "webp", "tiff"])
def test_transparent_pixels_come_out_white_not_the_colour_stored_under_them(
    tmp_path: Path, suffix: str
) -> None:
    shape = star()
    path = save(shape, tmp_path / f"star.{suffix}", "rgba")
    pixels, outside = decode_rgb(path), F.pil_to_tensor(shape.mask)[0] == 0
    assert (pixels[:, outside] == 255).all()
    if suffix == "png":  # what torchvision's RGB mode would have shown instead: the teal under alpha 0
        dropped = decode_image(
            torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), ImageReadMode.RGB
        )
        assert dropped[:, outside].float().mean(1).tolist() == list(map(float, TEAL))


def test_half_transparent_pixels_are_blended_onto_white(tmp_path: Path) -> None:
    Image.new("RGBA", (4, 4), (0, 0, 200, 128)).save(tmp_path / "half.png")
    assert decode_rgb(tmp_path / "half.png")[:, 0, 0].tolist() == [127, 127, 227]


def test_cmyk_red_stays_red(tmp_path: Path) -> None:
    Image.new("RGB", (24, 16), RED).convert("CMYK").save(tmp_path / "red.jpg")
    red, green, blue = read_image(tmp_path / "red.jpg", 3, (8, 8)).float().mean((1, 2)).tolist()
    assert red > 190 and green < 50 and blue < 60


def test_an_animated_gif_is_read_as_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, TEAL)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert decode_rgb(tmp_path / "anim.gif")[:, 0, 0].tolist() == list(RED)


def test_a_folder_of_every_size_format_and_mode_decodes_to_one_shape(tmp_path: Path) -> None:
    root = shapes_folder(tmp_path / "images", per_class=[14, 9, 12], formats=FORMATS, odd=6, grey=0.3)
    copy_image_folder(root, tmp_path / "raw")
    classes, splits = decode_folder(tmp_path / "raw", 24, 3)
    assert classes == ["circle", "square", "triangle"]
    assert splits["train"].images.shape == (35, 3, 24, 24)
    assert torch.bincount(splits["train"].labels).tolist() == [14, 9, 12]


# --- data.channels and data.image_size: auto ------------------------------------------------------------------


def grey_folder(root: Path) -> Path:
    """Grey files of every format, and grey pictures saved as colour files (equal red, green and blue)."""
    shapes_folder(root, per_class=7, grey=1.0, formats=FORMATS)
    for suffix in ("png", "jpg", "webp", "tiff"):
        shape = dataclasses.replace(star(), background=(90, 90, 90), ink=(230, 230, 230))
        save(shape, root / "star" / f"rgb.{suffix}")
    return root


def test_channels_auto_is_1_when_every_image_is_grey(tmp_path: Path) -> None:
    copy_image_folder(grey_folder(tmp_path / "images"), tmp_path / "raw")
    _, auto = decode_folder(tmp_path / "raw", 32, "auto")
    _, grey = decode_folder(tmp_path / "raw", 32, 1)
    assert auto["train"].images.shape == (25, 1, 32, 32)
    assert torch.equal(auto["train"].images, grey["train"].images), "the pixels predict reads with channels 1"


def test_channels_auto_is_3_once_one_image_is_in_colour(tmp_path: Path) -> None:
    root = grey_folder(tmp_path / "images")
    save(star(), root / "star" / "colour.webp")
    copy_image_folder(root, tmp_path / "raw")
    _, auto = decode_folder(tmp_path / "raw", 32, "auto")
    _, rgb = decode_folder(tmp_path / "raw", 32, 3)
    assert auto["train"].images.shape == (26, 3, 32, 32)
    assert torch.equal(auto["train"].images, rgb["train"].images), "the pixels predict reads with channels 3"
    photo = root / "star" / "colour.webp"
    assert torch.equal(read_image(photo, 3, (32, 32)), read_image(photo, "auto", (32, 32)))


def test_a_grey_image_is_the_same_whatever_channels_the_model_takes(tmp_path: Path) -> None:
    path = save(star(), tmp_path / "star.png", "grey")
    grey, rgb = read_image(path, 1, (20, 20)), read_image(path, 3, (20, 20))
    assert grey.shape == (1, 20, 20) and torch.equal(rgb, grey.expand(3, -1, -1))
    Image.new("RGB", (30, 30), "white").save(tmp_path / "white.png")
    assert (read_image(tmp_path / "white.png", 1, (8, 8)) == 255).all(), "white stays 255 in grey"


def test_image_size_auto_is_the_small_models_size() -> None:
    assert resolve_image_size("auto", "convnet") == 64 and resolve_image_size("auto", "mlp") == 64
    assert resolve_image_size(48, "cnn") == 48


@pytest.mark.parametrize(
    ("sides", "expected", "timm_expected"),
    [
        ([(8, 8)] * 5, 8, 80),  # tiny images stay tiny: never enlarged (timm: to its floor)
        ([(14, 14)] * 3 + [(300, 200)] * 2, 14, 80),  # the median, not the largest
        (
            [(500, 375)] * 4,
            64,
            224,
        ),  # photos: at most 64 for our networks, the architecture's size for timm's
        ([(5, 5)] * 3, 8, 80),  # below what the networks take: 8
        ([(60, 20)] * 3, 20, 80),  # the shorter side
        ([(160, 120)] * 3, 64, 120),  # timm: the images' own size between the floor and the architecture's
    ],
)
def test_image_size_auto_follows_the_folders_images(
    tmp_path: Path, sides: list, expected: int, timm_expected: int
) -> None:
    root = tmp_path / "images"
    for index, (width, height) in enumerate(sides):
        for label in ("a", "b"):
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.new("L", (width, height), 128).save(root / label / f"{index}.png")
    copy_image_folder(root, tmp_path / "raw")
    assert resolve_image_size("auto", "convnet", tmp_path / "raw") == expected
    assert resolve_image_size(32, "convnet", tmp_path / "raw") == 32
    assert resolve_image_size("auto", "timm:resnet18", tmp_path / "raw") == timm_expected


def test_preprocess_stage_resolves_auto_and_says_what_it_chose(tmp_path: Path, monkeypatch, capsys) -> None:
    root = shapes_folder(tmp_path / "images", per_class=10, grey=1.0, formats=("png", "jpg"))
    copy_image_folder(root, tmp_path / "data" / "raw")
    raw = default_params()
    raw["data"].update(dataset="folder", path="images", image_size="auto", channels="auto")
    raw["preprocess"].update(val_size=0.1, test_size=0.2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("preprocess_stage", REPO / "stages" / "preprocess.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)

    stage.main()

    summary, counts = capsys.readouterr().out.strip().splitlines()[-2:]
    # The shapes are drawn at 40 pixels: auto keeps their own size (never enlarged to 64).
    assert (
        "images of 1×40×40 (data.image_size auto: 40 (the images' median shorter side, within 8..64); "
        "data.channels auto: 1, every image is grey)" in summary
    )
    assert counts == "training images per class: circle 7, square 7, triangle 7"
    assert json.loads((tmp_path / "data/processed/meta.json").read_text())["image_shape"] == [1, 40, 40]


# --- Refusals --------------------------------------------------------------------------------------------------


def csv_source(tmp_path: Path, rows: str, header: str = "filename,label") -> Path:
    image(tmp_path / "data" / "a.png")
    image(tmp_path / "data" / "b.png")
    image(tmp_path / "outside.png")
    (tmp_path / "data" / "labels.csv").write_text(f"{header}\n{rows}")
    return tmp_path / "data" / "labels.csv"


def symlink_out_of_root(tmp_path: Path) -> Path:
    root = class_folders(tmp_path / "images", {"cat": 2, "dog": 2})
    os.symlink(image(tmp_path / "secret.png"), root / "cat" / "link.png")
    return root


def folder_link_out_of_root(tmp_path: Path) -> Path:
    root = class_folders(tmp_path / "images", {"cat": 2, "dog": 2})
    class_folders(tmp_path / "elsewhere", {"x": 1})
    os.symlink(tmp_path / "elsewhere" / "x", root / "dog" / "more")
    return root


def empty_class(tmp_path: Path) -> Path:
    root = class_folders(tmp_path / "images", {"cat": 2, "dog": 2})
    (root / "bird").mkdir()
    (root / "bird" / "notes.txt").write_text("no pictures yet\n")
    return root


def split_mismatch(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    class_folders(root / "train", {"cat": 2, "dog": 2})
    class_folders(root / "test", {"cat": 1, "emu": 1})
    return root


def empty_folder(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    return tmp_path / "images"


def csv_with_symlink_out(tmp_path: Path) -> Path:
    source = csv_source(tmp_path, "a.png,x\nlink.png,y\n")
    os.symlink(tmp_path / "outside.png", tmp_path / "data" / "link.png")
    return source


def train_beside_classes(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    class_folders(root / "train", {"cat": 2, "dog": 2})
    class_folders(root, {"extra": 1})
    return root


def two_validation_folders(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for split in ("train", "val", "valid"):
        class_folders(root / split, {"cat": 2, "dog": 2})
    return root


def validation_classes_differ(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    class_folders(root / "train", {"cat": 2, "dog": 2})
    class_folders(root / "valid", {"cat": 1, "emu": 1})
    return root


REFUSALS = {
    "missing-path": (lambda tmp: tmp / "nowhere", r"data.path .*nowhere does not exist"),
    "not-a-csv": (lambda tmp: image(tmp / "one.png"), r"data.path .*one.png is a file but not a .csv"),
    "one-class": (
        lambda tmp: class_folders(tmp / "images", {"cat": 3}),
        r"images: found 1 class \(cat\); a classifier needs at least 2",
    ),
    "no-images": (empty_folder, r"found 0 classes \(no images\)"),
    "class-without-images": (empty_class, r"class folder bird has no images"),
    "symlink-out-of-root": (symlink_out_of_root, r"cat/link.png is a symlink to .*secret.png, outside "),
    "folder-symlink-out-of-root": (
        folder_link_out_of_root,
        r"dog/more is a symlink to .*elsewhere/x, outside",
    ),
    "train-test-classes-differ": (split_mismatch, r"train/ and test/ must hold .*; only one has dog, emu"),
    "train-beside-other-folders": (train_beside_classes, r"has train/ beside extra/; use either"),
    "two-validation-folders": (two_validation_folders, r"has val/ and valid/: keep one validation folder"),
    "train-valid-classes-differ": (
        validation_classes_differ,
        r"train/ and valid/ must hold the same class folders; only one has dog, emu",
    ),
    "csv-parent": (
        lambda tmp: csv_source(tmp, "a.png,x\n../outside.png,y\n"),
        r"labels.csv row 3: ../outside.png is outside the CSV's folder",
    ),
    "csv-absolute": (
        lambda tmp: csv_source(tmp, f"a.png,x\n{tmp}/outside.png,y\n"),
        r"labels.csv row 3: /.*outside.png is outside the CSV's folder",
    ),
    "csv-missing-file": (
        lambda tmp: csv_source(tmp, "a.png,x\nb.png,y\nc.png,y\n"),
        r"labels.csv row 4: c.png does not exist in ",
    ),
    "csv-symlink-out": (
        csv_with_symlink_out,
        r"labels.csv row 3: link.png is a symlink to .*outside.png, outside the CSV's folder",
    ),
    "csv-header": (lambda tmp: csv_source(tmp, "a.png,x\n", header="file,class"), r"must name the columns"),
    "csv-empty-label": (
        lambda tmp: csv_source(tmp, "a.png,x\nb.png,\n"),
        r"row 3: needs both a filename and",
    ),
    "csv-twice": (
        lambda tmp: csv_source(tmp, "a.png,x\n./a.png,y\n"),
        r"row 3: ./a.png is listed twice \(row 2",
    ),
    "csv-not-image": (
        lambda tmp: csv_source(tmp, "a.png,x\nlabels.csv,y\n"),
        r"row 3: labels.csv is not an image file",
    ),
}


@pytest.mark.parametrize(("make", "message"), REFUSALS.values(), ids=REFUSALS.keys())
def test_bad_folders_are_refused_in_one_line(tmp_path: Path, make, message: str) -> None:
    source = make(tmp_path)
    with pytest.raises(UserError, match=message) as error:
        copy_image_folder(source, tmp_path / "raw")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "raw").exists()


def test_an_error_while_copying_keeps_the_old_raw_folder(tmp_path: Path, monkeypatch) -> None:
    raw = tmp_path / "data" / "raw"
    copy_image_folder(class_folders(tmp_path / "old", {"ant": 1, "bee": 1}), raw)
    before = {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    copies = []

    def failing_copy(source, target):
        if len(copies) == 3:
            raise OSError(28, "No space left on device")
        copies.append(target)
        return folder_copy(source, target)

    folder_copy = folder.shutil.copyfile
    monkeypatch.setattr(folder.shutil, "copyfile", failing_copy)
    with pytest.raises(UserError, match=r"cannot copy .*new/dog/0.png into .*raw: No space left on device"):
        copy_image_folder(class_folders(tmp_path / "new", {"cat": 3, "dog": 3}), raw)
    assert {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"], "no temporary folder left behind"

    monkeypatch.undo()
    copy_image_folder(tmp_path / "new", raw)  # a good copy replaces everything, old files included
    assert len(manifest(raw)) == 6 and not (raw / "images/ant").exists()
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"]


# --- The whole pipeline ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make setup)")
def test_pipeline_on_a_folder_of_real_images(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    run([sys.executable, str(REPO / "scripts/make_example_folder.py"), "--count", "300"], cwd=repo)
    folders = sorted(p.name for p in (repo / "data/images").iterdir() if p.is_dir())
    assert len(folders) == 10 and "T-shirt-top" in folders
    raw = default_params()
    raw["data"].update(dataset="folder", path="data/images", image_size=16, channels=3)
    raw["preprocess"].update(val_size=0.1, test_size=0.2)
    raw["train"].update(width=4, epochs=2, batch_size=32, lr=0.05, device="cpu")
    write_params(repo, raw)

    output = run(["dvc", "repro"], cwd=repo).stdout
    for stage in ("fetch", "preprocess", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in output
    assert (
        "copied 300 images of 10 classes (train 300)" in output and "skipped non-image files: 1" in output
    )  # README

    meta = json.loads((repo / "data/processed/meta.json").read_text())
    assert meta["classes"] == folders and meta["image_shape"] == [3, 16, 16]
    assert meta["sizes"] == {"train": 216, "val": 24, "test": 60}
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert list(metrics["per_class"]) == folders
    predictions = list(csv.DictReader((repo / "reports/evaluate/predictions.csv").open()))
    assert len(predictions) == 60 and {row["actual"] for row in predictions} == set(folders)
    assert {row["predicted"] for row in predictions} <= set(folders)
    for png in ("reports/evaluate/confusion.png", "reports/evaluate/misclassified.png"):
        assert (repo / png).read_bytes()[:4] == b"\x89PNG"
    export = json.loads((repo / "reports/export/metrics.json").read_text())
    assert export["onnx_checked_images"] == 60 and export["onnx_prediction_agreement"] == 1.0
    assert (repo / "models/export/model.onnx").stat().st_size > 0

    shoe = next((repo / "data/images/Ankle boot").iterdir())
    line = run(["predict", str(shoe.relative_to(repo))], cwd=repo).stdout.strip()
    predicted = re.fullmatch(r'data/images/Ankle boot/\d+\.png: Predicted: "([^"]+)" \(\d+\.\d%\)', line)
    assert predicted and predicted[1] in folders, line

    registered = run(
        [
            sys.executable,
            "-c",
            "import json, mlflow; mlflow.set_tracking_uri('sqlite:///mlruns/mlflow.db'); "
            "print(json.dumps(mlflow.models.get_model_info('models:/images-classifier/1').metadata))",
        ],
        cwd=repo,
    )
    assert json.loads(registered.stdout.strip().splitlines()[-1])["classes"] == folders


def _jpeg(path: Path, pixels: np.ndarray, **options) -> Path:
    Image.fromarray(pixels).save(path, "JPEG", **options)
    return path


def test_plain_jpegs_are_decoded_by_libjpeg_turbo_with_pillows_pixels(tmp_path: Path) -> None:
    # Smooth colour, as photos are (noise would hide a wrong upsampling or scale), plus grey and progressive files.
    y, x = np.mgrid[0:300, 0:400]
    colour = np.stack([x * 255 // 400, y * 255 // 300, (x + y) * 255 // 700], axis=2).astype(np.uint8)
    plain = [
        _jpeg(tmp_path / "baseline.jpg", colour, quality=90),
        _jpeg(tmp_path / "progressive.jpg", colour, progressive=True),
        _jpeg(tmp_path / "grey.jpg", colour[:, :, 0]),
        _jpeg(tmp_path / "small.jpg", colour[:28, :28]),
    ]
    for path in plain:
        for size in [
            (28, 28),
            (64, 48),
            (150, 150),
            (300, 400),
        ]:  # draft scales 8, 4, 2 and 1 for the large files
            assert images._turbo_decoded(path, max(size)) is not None, path.name
            for channels in (1, 3, "auto"):
                assert np.array_equal(
                    images.read_array(path, channels, size), images.pillow_array(path, channels, size)
                ), (path.name, size, channels)
    # An EXIF block (it may ask for a rotation) and CMYK go through Pillow, which reads them right.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the upright image is 300 wide, 400 high
    rotated = _jpeg(tmp_path / "rotated.jpg", colour, exif=exif)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(colour).convert("CMYK").save(cmyk, "JPEG")
    for path in (rotated, cmyk):
        assert images._turbo_decoded(path, 64) is None, path.name
    assert images.read_array(rotated, 3, (400, 300)).shape == (3, 400, 300)
    assert images.read_array(rotated, 3, (40, 30))[:, :3, :3].mean() > 100, (
        "the top left is the old bottom left"
    )
