"""Benchmark for timm models: our train loop against timm's own train.py, and a fine-tune through the pipeline.

    make bench-timm TIMM_TRAIN=/path/to/pytorch-image-models/train.py
    python benchmarks/bench_timm.py [--timm-train PATH] [--sizes 64 128 224] [--images 320]

Rows (a markdown table, the machine first):
- training throughput (images/s) and peak memory of `timm:resnet18` at each size: our train loop (data on the
  device, batches as index slices) against timm's train.py on the same images as a folder (same model, batch 32,
  precision, no augmentation in either, no validation); each in its own child process;
- a fine-tune of `timm:resnet18` from random weights on a folder of 2,000 real images (Fashion-MNIST test images
  as PNGs, 10 classes, `make example-folder`), through `dvc repro`: its time and test accuracy. On a machine with
  internet the same run with `train.pretrained: default` is the headline: see docs/fine-tuning.md.

timm's train.py is not in timm's wheel: get it from the timm release you have installed,
`curl -LO https://raw.githubusercontent.com/huggingface/pytorch-image-models/v1.0.31/train.py`.
Needs the fetched Fashion-MNIST files (data/raw, from `dvc repro fetch`).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import run_child, table_header, table_row

REPO = Path(__file__).resolve().parent.parent
BATCH = 32
ARCH = "resnet18"


def example_folder(dest: Path, count: int) -> Path:
    sources = ["--source", str(REPO / "data/raw"), "--source", "/usr/share/datasets/fashion-mnist"]
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/make_example_folder.py"),
            "--dest",
            str(dest),
            "--count",
            str(count),
            *sources,
        ],
        check=True,
        capture_output=True,
    )
    return dest


def ours(folder: Path, size: int) -> dict:
    """One epoch of our train loop over the folder's images at `size` pixels (decoded beforehand, as preprocess
    does), augmentation and validation off."""
    import torch

    from image_classifier import params as params_module
    from image_classifier.data import Split
    from image_classifier.folder import IMAGE_SUFFIXES
    from image_classifier.images import read_image
    from image_classifier.train import train

    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted({path.parent.name for path in files})
    images = torch.stack([read_image(path, 3, (size, size)) for path in files])
    labels = torch.tensor([classes.index(path.parent.name) for path in files])
    raw = params_module.load(REPO / "params.yaml").model_dump()
    raw["train"].update(
        model=f"timm:{ARCH}",
        epochs=1,
        batch_size=BATCH,
        augment="basic",
        crop_padding=0,
        flip=False,
        schedule="none",
        device="cpu",
    )
    params = params_module.from_dict(raw).train
    config = {
        "dataset": "folder",
        "model": f"timm:{ARCH}",
        "width": 0,
        "test_time_flip": False,
        "image_shape": [3, size, size],
        "classes": classes,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    empty = Split(images[:0], labels[:0])
    with tempfile.TemporaryDirectory() as scratch:
        result = train(
            params, config, Split(images, labels), empty, torch.device("cpu"), Path(scratch) / "c.pt"
        )
    return {"images_per_second": result.history[-1]["samples_per_second"]}


def timms(folder: Path, size: int, train_py: Path, precision: str) -> dict:
    """timm's train.py, one epoch over the same folder: its own log gives the average images/s of the epoch."""
    with tempfile.TemporaryDirectory() as output:
        args = [
            sys.executable,
            str(train_py),
            str(folder),
            "--model",
            ARCH,
            "--num-classes",
            "10",
            "--img-size",
            str(size),
            "-b",
            str(BATCH),
            "--epochs",
            "1",
            "--no-aug",
            "--val-split",
            "",
            "--device",
            "cpu",
            "--workers",
            "2",
            "--channels-last",
            "--warmup-epochs",
            "0",
            "--log-interval",
            "1",
            "--output",
            output,
            "--opt",
            "adamw",
            "--lr",
            "1e-3",
        ]
        if precision == "bf16":
            args += ["--amp", "--amp-dtype", "bfloat16"]
        done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"timm's train.py failed:\n{done.stderr[-3000:]}")
    rates = re.findall(r"\(\s*[\d.]+s,\s*([\d.]+)/s\)", done.stdout + done.stderr)
    return {"images_per_second": float(rates[-1])}


def fine_tune(count: int, size: int, epochs: int) -> dict:
    """`dvc repro` on a folder of `count` real images with train.model timm:resnet18 from random weights."""
    from repository import copy_repository

    with tempfile.TemporaryDirectory() as scratch:
        repo = copy_repository(Path(scratch) / "repo")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        for command in (["git", "init", "-q"], ["dvc", "init", "-q", "-f"]):
            subprocess.run(command, cwd=repo, env=env, check=True)
        example_folder(repo / "data/images", count)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["data"].update(dataset="folder", image_size=size)
        params["train"].update(model=f"timm:{ARCH}", epochs=epochs)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        started = time.perf_counter()
        subprocess.run(["dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - started
        train = json.loads((repo / "reports/train/metrics.json").read_text())
        test = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    return {"seconds": wall, "train_seconds": train["train_seconds"], "test_accuracy": test["accuracy"]}


def child(args: list[str]) -> tuple[dict, float]:
    """Run one measurement in a fresh process; return its result and the process's peak resident memory (MB)."""
    return run_child([sys.executable, __file__, "--child", *args], str(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", type=Path, help="timm's train.py (not in its wheel; see above)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--images", type=int, default=320, help="images per throughput epoch (default 320)")
    parser.add_argument(
        "--fine-tune", type=int, nargs=3, default=[2000, 64, 10], metavar=("IMAGES", "PX", "EPOCHS")
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "ours":
            result = ours(Path(rest[0]), int(rest[1]))
        elif kind == "timm":
            result = timms(Path(rest[0]), int(rest[1]), Path(rest[2]), rest[3])
        else:
            result = fine_tune(*map(int, rest))
        print(json.dumps(result))
        return

    import torch

    from image_classifier.device import autocast_dtype

    precision = "bf16" if autocast_dtype(torch.device("cpu"), "auto") else "fp32"
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = example_folder(Path(scratch) / "images", args.images)
        for size in args.sizes:
            mine, mine_mb = child(["ours", str(folder), str(size)])
            row = [
                f"`timm:{ARCH}` at {size} px, batch {BATCH}, {precision}: images/s, peak memory",
                f"{mine['images_per_second']:.1f}/s, {mine_mb:.0f} MB",
            ]
            if args.timm_train:
                theirs, theirs_mb = child(["timm", str(folder), str(size), str(args.timm_train), precision])
                ratio = mine["images_per_second"] / theirs["images_per_second"]
                row += [f"{theirs['images_per_second']:.1f}/s, {theirs_mb:.0f} MB", f"{ratio:.2f}x"]
            else:
                row += ["(--timm-train not given)", ""]
            rows.append(row)
    count, size, epochs = args.fine_tune
    tuned, _tuned_mb = child(["fine-tune", str(count), str(size), str(epochs)])
    rows.append(
        [
            f"`dvc repro`, {count} Fashion-MNIST PNGs (10 classes), `timm:{ARCH}` from random weights, {size} px, "
            f"{epochs} epochs: wall (training), test accuracy",
            f"{tuned['seconds']:.0f} s ({tuned['train_seconds']:.0f} s), {tuned['test_accuracy']:.4f}",
            "",
            "",
        ]
    )
    print("\n" + "\n".join(table_header("cpu", ("Measurement", "ours", "timm's train.py", "ours / timm"))))
    for row in rows:
        print(table_row(row))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    main()
