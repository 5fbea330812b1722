"""The data sets the pipeline knows: where their files come from, how to check them, and the file formats.

Adding a built-in data set means adding an entry to DATASETS. Users declare their own, in a supported format,
in datasets.yaml at the repository root (see that file); `get_dataset` reads both.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from image_classifier.errors import UserError

USER_DATASETS_FILE = Path("datasets.yaml")
FORMATS = ("idx", "cifar-binary")
# The files each format needs, by role. An idx file is served as `<name>.gz` and stored decompressed;
# a cifar-binary archive is served and stored as is, and extracted beside itself.
FORMAT_ROLES = {
    "idx": ("train_images", "train_labels", "test_images", "test_labels"),
    "cifar-binary": ("archive",),
}

# CIFAR-10's binary version: every record is one label byte and 32x32 pixels per channel (R, then G, then B).
CIFAR_SHAPE = (3, 32, 32)
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32
CIFAR_BATCH_RECORDS = 10000  # the most records one batch file holds
CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_TRAIN_BATCHES = tuple(f"{CIFAR_DIR}/data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_BATCH = f"{CIFAR_DIR}/test_batch.bin"
CIFAR_META = f"{CIFAR_DIR}/batches.meta.txt"
# Every member a cifar-binary archive may hold, with the most bytes it may have: a batch can never be larger
# than its records, so a member that is is damage or an attack, refused before a byte is written.
CIFAR_MEMBERS = {
    **dict.fromkeys((*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH), CIFAR_BATCH_RECORDS * CIFAR_RECORD_BYTES),
    CIFAR_META: 4096,
    f"{CIFAR_DIR}/readme.html": 65536,  # in the real archive; optional, never read
}
CIFAR_REQUIRED = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH, CIFAR_META)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set, as it is stored in data/raw: `name`, `size` in bytes, and its checksum.

    `sha256` is of the stored bytes (decompressed, for a gzipped file), so a file checks the same whether it
    arrived gzipped or plain, and can be checked again at any time. Where the publisher gives only `md5`, it
    is of the file as served (`<name>.gz` when `gzipped`), so it can be checked only while downloading.
    `gzipped`: served as `<name>.gz` and stored decompressed; otherwise served and stored as is.
    """

    name: str
    sha256: str
    size: int
    md5: str = ""
    gzipped: bool = True


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: its files by role (FORMAT_ROLES), the mirrors that serve them (`<mirror>/<file name>.gz`,
    or `<mirror>/<file name>` for a file served as is), its class names and (channels, height, width)."""

    name: str
    format: str
    files: dict[str, RemoteFile]
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]


# MNIST and the sets made in its image (Fashion-MNIST, KMNIST): the same four files, decompressed sizes.
MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", 47040016),
    "train_labels": ("train-labels-idx1-ubyte", 60008),
    "test_images": ("t10k-images-idx3-ubyte", 7840016),
    "test_labels": ("t10k-labels-idx1-ubyte", 10008),
}


def _mnist_files(checksums: dict[str, str], kind: str = "sha256") -> dict[str, RemoteFile]:
    """MNIST_FILES with `checksums` by role: sha256 of the decompressed files, or with kind="md5" the md5
    of the .gz files as served."""
    files = {}
    for role, (name, size) in MNIST_FILES.items():
        sha256, md5 = (checksums[role], "") if kind == "sha256" else ("", checksums[role])
        files[role] = RemoteFile(name, sha256, size, md5=md5)
    return files


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        format="idx",
        files=_mnist_files(
            {
                "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            }
        ),
        mirrors=(
            "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        ),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        image_shape=(1, 28, 28),
    ),
    "mnist": DatasetSpec(
        name="mnist",
        format="idx",
        files=_mnist_files(
            {
                "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            }
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        classes=tuple(str(digit) for digit in range(10)),
        image_shape=(1, 28, 28),
    ),
    "kmnist": DatasetSpec(
        name="kmnist",
        format="idx",
        # Only the md5 of each .gz is published (torchvision's table): checked while downloading.
        files=_mnist_files(
            {
                "train_images": "bdb82020997e1d708af4cf47b453dcf7",
                "train_labels": "e144d726b3acfaa3e44228e80efcd344",
                "test_images": "5c965bf0a639b31b8f53240b1b52f4d7",
                "test_labels": "7320c461ea6c1c855c0b718fb2a4b134",
            },
            kind="md5",
        ),
        mirrors=("https://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        image_shape=(1, 28, 28),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        format="cifar-binary",
        files={
            "archive": RemoteFile(
                "cifar-10-binary.tar.gz", "", 170052171, md5="c32a1d4ab5d03f1284b67883e8d87530", gzipped=False
            )
        },
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        image_shape=CIFAR_SHAPE,
    ),
}


def get_dataset(name: str, user_file: Path = USER_DATASETS_FILE) -> DatasetSpec:
    """The spec of data set `name`, built in or declared in `user_file`; a UserError listing the known names
    if there is none, or naming the problem if `user_file` is malformed."""
    table = {**DATASETS, **load_user_datasets(user_file)}
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise UserError(f"unknown data set {name!r}; known data sets: {known}") from None


def load_user_datasets(path: Path = USER_DATASETS_FILE) -> dict[str, DatasetSpec]:
    """The data sets declared in `path` (none if it does not exist), each checked like a built-in entry."""
    if not Path(path).is_file():
        return {}
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: YAML syntax error{where}: {getattr(error, 'problem', error)}") from None
    if raw is None:
        return {}
    _expect(isinstance(raw, dict), path, "the top level", raw, "a mapping of data set names to declarations")
    specs = {}
    for name, entry in raw.items():
        _expect(
            isinstance(name, str) and re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name) is not None,
            path,
            "a data set name",
            name,
            "lower-case letters, digits, '.', '_' or '-'",
        )
        if name in DATASETS or name == "folder":
            raise UserError(f"{path}: data set {name!r} is built in; give yours another name")
        specs[name] = _user_spec(name, entry, path)
    return specs


def _user_spec(name: str, entry: Any, path: Path) -> DatasetSpec:
    keys = ("format", "files", "mirrors", "classes", "image_shape")
    _expect(isinstance(entry, dict), path, name, entry, f"a mapping with keys {', '.join(keys)}")
    unknown = sorted(set(entry) - set(keys))
    missing = [key for key in keys if key not in entry]
    if unknown or missing:
        problem = f"unknown key {name}.{unknown[0]}" if unknown else f"missing key {name}.{missing[0]}"
        raise UserError(f"{path}: {problem}; a data set has keys {', '.join(keys)}")
    fmt = entry["format"]
    _expect(fmt in FORMATS, path, f"{name}.format", fmt, " or ".join(FORMATS))
    files = entry["files"]
    roles = FORMAT_ROLES[fmt]
    _expect(
        isinstance(files, dict) and set(files) == set(roles),
        path,
        f"{name}.files",
        files,
        f"a mapping of exactly {', '.join(roles)}",
    )
    mirrors = entry["mirrors"]
    _expect(
        isinstance(mirrors, list)
        and all(isinstance(m, str) and re.match(r"https?://[^/\s]+", m) for m in mirrors),
        path,
        f"{name}.mirrors",
        mirrors,
        "a list of http(s):// base URLs (may be empty)",
    )
    classes = entry["classes"]
    _expect(
        isinstance(classes, list)
        and 2 <= len(classes) <= 256
        and all(isinstance(c, str) and c.strip() for c in classes)
        and len(set(classes)) == len(classes),
        path,
        f"{name}.classes",
        classes,
        "a list of 2 to 256 distinct, non-empty names",
    )
    shape = entry["image_shape"]
    allowed_shape = "[3, 32, 32] (the format's only shape)" if fmt == "cifar-binary" else "[1, height, width]"
    shape_ok = isinstance(shape, list) and len(shape) == 3 and all(type(s) is int and s >= 1 for s in shape)
    shape_ok = shape_ok and (tuple(shape) == CIFAR_SHAPE if fmt == "cifar-binary" else shape[0] == 1)
    _expect(shape_ok, path, f"{name}.image_shape", shape, allowed_shape)
    return DatasetSpec(
        name=name,
        format=fmt,
        files={
            role: _user_file(f"{name}.files.{role}", files[role], path, gzipped=fmt == "idx")
            for role in roles
        },
        mirrors=tuple(mirrors),
        classes=tuple(classes),
        image_shape=tuple(shape),
    )


def _user_file(key: str, entry: Any, path: Path, gzipped: bool) -> RemoteFile:
    keys = {"name", "size", "sha256", "md5"}
    _expect(
        isinstance(entry, dict) and {"name", "size"} <= set(entry) <= keys,
        path,
        key,
        entry,
        "a mapping with name, size and sha256 or md5",
    )
    name, size = entry["name"], entry["size"]
    # A plain file name: it becomes a path under data/raw and part of a URL.
    _expect(
        isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) is not None,
        path,
        f"{key}.name",
        name,
        "a plain file name (letters, digits, '.', '_', '-')",
    )
    _expect(type(size) is int and size > 0, path, f"{key}.size", size, "a number of bytes above 0")
    for kind, digits in (("sha256", 64), ("md5", 32)):
        value = entry.get(kind, "")
        _expect(
            value == "" or (isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{digits}}}", value)),
            path,
            f"{key}.{kind}",
            value,
            f"{digits} lower-case hex digits",
        )
    _expect(bool(entry.get("sha256") or entry.get("md5")), path, key, entry, "a sha256 or an md5 checksum")
    return RemoteFile(name, entry.get("sha256", ""), size, entry.get("md5", ""), gzipped)


def _expect(condition: bool, path: Path, key: str, value: Any, allowed: str) -> None:
    if not condition:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise UserError(f"{path}: {key} = {shown} is not allowed; expected {allowed}")
