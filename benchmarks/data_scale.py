"""Data bigger than memory (issue 14): the rows `python benchmarks/bench.py --data-scale` adds.

    python benchmarks/bench.py --data-scale [--scale-images 50000] [--scale-dir /var/tmp/bench-scale]

- A generated folder of JPEGs at 128×128 RGB (50,000: 2.46 GB as uint8): preprocess (the library calls of the
  preprocess stage, every core) in images/s against a torchvision ImageFolder + DataLoader(num_workers=2) pass
  that decodes and resizes the same files; peak resident memory of preprocess and of one streamed training
  epoch, on the whole folder and on a quarter of it (how memory grows with the data).
- Photo-sized JPEGs (a fifth as many, 500×375, as many photo sets come) to 224×224: the same two passes, where
  the decode is most of the work and JPEG's DCT scaling (`Image.draft`) applies.
- Fashion-MNIST, default config, all epochs: streamed (`train.data_in_memory: false`) against in memory:
  training throughput, test accuracy, and whether the weights are the same.

Each measurement runs in a fresh child process (bench.measure), which reports its own peak memory. The folder is
generated once and kept in --scale-dir for reruns.
"""

import csv
import hashlib
import json
import multiprocessing  # only to draw the benchmark's JPEGs, with spawn: never a fork after torch
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIZE = 128
CLASSES = 10
# The photo rows: (width, height) of the generated files, and the size preprocess and ImageFolder resize them to.
PHOTO_SIZE = (500, 375)
PHOTO_TARGET = 224


def scale_dir() -> Path:
    return Path(os.environ["BENCH_SCALE_DIR"])


def _draw(task: tuple[Path, int, int, tuple[int, int]]) -> None:
    """One smooth JPEG of `size` (width, height): a shape whose kind is the class, at a random place and colour,
    on a gradient."""
    from PIL import Image, ImageDraw

    path, label, seed, (width, height) = task
    rng = random.Random(seed)
    top, bottom = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image = Image.composite(
        Image.new("RGB", image.size, top), Image.new("RGB", image.size, bottom), image.getchannel(0)
    )
    draw = ImageDraw.Draw(image)
    radius = rng.randint(20, 50) * min(width, height) // SIZE
    x, y = rng.randint(radius, width - radius), rng.randint(radius, height - radius)
    ink = tuple(rng.randrange(256) for _ in range(3))
    draw.regular_polygon((x, y, radius), 3 + label, rotation=rng.uniform(0, 360), fill=ink)
    image.save(path, quality=90)


def generate(root: Path, count: int, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    """`count` JPEGs of `size` in <root>/<class>/<n>.jpg, CLASSES classes, made once (a marker file says it is
    complete)."""
    marker = root.with_name(f"{root.name}-complete-{count}")
    if marker.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for old in root.parent.glob(f"{root.name}-complete-*"):
        old.unlink()
    tasks = []
    for n in range(count):
        folder = root / f"class{n % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        tasks.append((folder / f"{n}.jpg", n % CLASSES, n, size))
    with multiprocessing.get_context("spawn").Pool() as pool:
        pool.map(_draw, tasks, chunksize=256)
    marker.touch()
    return root


def prepare(count: int) -> dict:
    """The generated folder, fetched into raw/ (as the fetch stage copies it), and raw-quarter/: a manifest of
    every fourth of its rows (every class) over the same image files."""
    from image_classifier.folder import copy_image_folder

    base = scale_dir()
    images = generate(base / "images", count)
    raw = base / "raw"
    if not (raw / "labels.csv").is_file() or sum(1 for _ in (raw / "labels.csv").open()) != count + 1:
        copy_image_folder(images, raw)
    photos = generate(base / "photos", count // 5, PHOTO_SIZE)
    if not (base / "raw-photos/labels.csv").is_file():
        copy_image_folder(photos, base / "raw-photos")
    quarter = base / "raw-quarter"
    shutil.rmtree(quarter, ignore_errors=True)
    quarter.mkdir()
    (quarter / "images").symlink_to(raw / "images")
    with (raw / "labels.csv").open() as file:
        rows = list(csv.reader(file))
    with (quarter / "labels.csv").open("w", newline="") as file:
        csv.writer(file).writerows(rows[:1] + rows[1::4])
    return {
        "images": count,
        "quarter": count // 4,
        "disk_mb": _folder_mb(images),
        "photos": count // 5,
        "photos_disk_mb": _folder_mb(photos),
    }


def _folder_mb(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6


def _processed(name: str) -> Path:
    return scale_dir() / f"processed-{name}"


def preprocess_folder(which: str, size: int = SIZE) -> dict:
    """The preprocess stage's library call (splits from the file list, decoded by threads straight into the
    final shards) on raw/, raw-quarter/ or raw-photos/, at `size` pixels."""
    from image_classifier import params as params_module
    from image_classifier.folder_preprocess import preprocess_folder as run

    params = params_module.load(REPO / "params.yaml")
    raw = scale_dir() / {"full": "raw", "quarter": "raw-quarter", "photos": "raw-photos"}[which]
    out = _processed(which)
    shutil.rmtree(out, ignore_errors=True)  # a fresh layout, as a first run
    started = time.perf_counter()
    files = {name: out / name for name in ("train", "val", "test")}
    meta = run(raw, size, 3, params.preprocess, files, out / "meta.json", out / "s.png")
    seconds = time.perf_counter() - started
    shards = len(list((out / "train").glob("images-*.npy")))
    return {"seconds": seconds, "images": sum(meta.sizes.values()), "train_shards": shards}


def shard_compaction(which: str = "full") -> dict:
    """What a failed image costs: decoding.py's compaction of the largest training shard that preprocess_folder
    stored, on a copy with one image in its middle marked failed (the shard is rewritten without it)."""
    import numpy as np

    from image_classifier.decoding import FilledShard, _finish_shard

    shard = max((_processed(which) / "train").glob("images-*.npy"), key=lambda path: path.stat().st_size)
    with tempfile.TemporaryDirectory(dir=scale_dir()) as scratch:
        copy = Path(scratch) / shard.name
        shutil.copyfile(shard, copy)
        count = len(np.load(copy, mmap_mode="r"))
        outcomes = [(False, None)] * count
        outcomes[count // 2] = (False, "unreadable")
        started = time.perf_counter()
        _finish_shard(copy, outcomes, FilledShard([], [], False, None))
        seconds = time.perf_counter() - started
        kept = len(np.load(copy, mmap_mode="r"))
    return {"seconds": seconds, "shard_mb": shard.stat().st_size / 1e6, "images": count, "kept": kept}


def repeated_preprocess(times: int, images: int = 2_000) -> dict:
    """The preprocess stage script `times` times in a row on `images` of the folder, each under a timeout and with
    DeprecationWarning an error (Python's fork-with-threads warning): how many runs hung (issue 25)."""
    import subprocess

    import yaml

    work = scale_dir() / "repeat"
    shutil.rmtree(work, ignore_errors=True)
    (work / "data/raw").mkdir(parents=True)
    (work / "data/raw/images").symlink_to(scale_dir() / "raw/images")
    with (scale_dir() / "raw/labels.csv").open() as file:
        rows = list(csv.reader(file))
    with (work / "data/raw/labels.csv").open("w", newline="") as file:
        csv.writer(file).writerows(rows[:1] + rows[1 :: max(1, (len(rows) - 1) // images)][:images])
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(dataset="folder", path="images", image_size=SIZE, channels=3)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    hangs, seconds = 0, []
    for _ in range(times):
        started = time.perf_counter()
        try:
            subprocess.run(
                [sys.executable, "-W", "error::DeprecationWarning", str(REPO / "stages/preprocess.py")],
                cwd=work,
                check=True,
                capture_output=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            hangs += 1
        seconds.append(time.perf_counter() - started)
    return {"runs": times, "hangs": hangs, "median_seconds": sorted(seconds)[len(seconds) // 2]}


def imagefolder_pass(folder: str = "images", size: int = SIZE) -> dict:
    """torchvision's ImageFolder + DataLoader(num_workers=2): decode and resize every file of the folder once."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    dataset = datasets.ImageFolder(
        str(scale_dir() / folder),
        transform=transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()]),
    )
    started = time.perf_counter()
    seen = 0
    for images, _ in DataLoader(dataset, batch_size=256, num_workers=2):
        seen += len(images)
    assert seen == len(dataset) and images.dtype == torch.uint8
    return {"seconds": time.perf_counter() - started, "images": seen}


def _train(overrides: dict, train_split, val_split, config_extra: dict, on_step=None) -> tuple:
    import torch
    import yaml

    from image_classifier import params as params_module
    from image_classifier.device import configure_host
    from image_classifier.train import train

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(device="cpu", **overrides)
    params = params_module.from_dict(raw)
    configure_host(params.train.threads)
    with tempfile.TemporaryDirectory() as scratch:
        result = train(
            params.train,
            config_extra,
            train_split,
            val_split,
            torch.device("cpu"),
            Path(scratch) / "r.pt",
            on_step=on_step,
        )
    return result, params


def streamed_epoch(which: str) -> dict:
    """One epoch of a small CNN on the stored 128-pixel folder, streamed from its shards."""
    from image_classifier.data import Meta, load_split

    out = _processed(which)
    meta = Meta.load(out / "meta.json")
    train_split, val_split = load_split(out / "train"), load_split(out / "val")
    config = {
        "dataset": "folder",
        "model": "cnn",
        "width": 8,
        "test_time_flip": False,
        "image_shape": meta.image_shape,
        "classes": meta.classes,
        "mean": meta.mean,
        "std": meta.std,
    }
    overrides = {"epochs": 1, "batch_size": 64, "data_in_memory": False, "crop_padding": 0}
    # Sampled after every step: the mapped shard pages counted in the resident total are the page cache's.
    anon = [_rss_anon_mb()]
    result, _ = _train(
        overrides, train_split, val_split, config, lambda step, model: anon.append(_rss_anon_mb())
    )
    row = result.history[-1]
    return {
        "seconds": row["epoch_seconds"],
        "samples_per_second": row["samples_per_second"],
        "data_mb": train_split.images.nbytes / 1e6,
        "mode": result.data_mode.line,
        "peak_anon_mb": max(anon),
    }


def _rss_anon_mb() -> float:
    """This process's anonymous resident memory (/proc/self/status RssAnon), in MB: what it holds itself."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fashion_mnist_shards() -> dict:
    """Fashion-MNIST stored as shards by the preprocess library call, for both training modes. In a child of its
    own: preprocessing in the process that then trains left glibc's heap tuned by its large blocks, and that run
    trained 15-30% faster than the others (before training set the allocator itself; docs/benchmarks.md)."""
    from common import preprocess_fashion_mnist

    return {"seconds": preprocess_fashion_mnist(scale_dir() / "fashion-mnist")}


def fashion_mnist(in_memory: bool) -> dict:
    """The default config on Fashion-MNIST, from the shards fashion_mnist_shards stored, all epochs."""
    import torch

    from image_classifier.batches import split_logits
    from image_classifier.data import Meta, load_split
    from image_classifier.models import build_model, resolve_model

    out = scale_dir() / "fashion-mnist"
    meta = Meta.load(out / "meta.json")
    model, width = resolve_model("auto", "auto", meta.dataset)
    config = {
        "dataset": meta.dataset,
        "model": model,
        "width": width,
        "test_time_flip": True,
        "image_shape": meta.image_shape,
        "classes": meta.classes,
        "mean": meta.mean,
        "std": meta.std,
    }
    result, _ = _train(
        {"data_in_memory": in_memory}, load_split(out / "train"), load_split(out / "val"), config
    )
    network = build_model(config)
    network.load_state_dict(result.best_state)
    test = load_split(out / "test")
    logits = split_logits(network, test, 1000)
    digest = hashlib.sha256()
    for key in sorted(result.best_state):
        digest.update(result.best_state[key].contiguous().numpy().tobytes())
    seconds = sum(row["epoch_seconds"] for row in result.history)
    seen = sum(row["samples_per_second"] * row["epoch_seconds"] for row in result.history)
    return {
        "seconds": seconds,
        "samples_per_second": seen / seconds,
        "test_accuracy": (logits.argmax(1) == test.labels).double().mean().item(),
        "weights_sha256": digest.hexdigest(),
        "mode": result.data_mode.line,
        "epochs": len(result.history),
        "_": torch.__version__,
    }


MEASUREMENTS = {
    "scale-preprocess-full": lambda device: preprocess_folder("full"),
    "scale-preprocess-quarter": lambda device: preprocess_folder("quarter"),
    "scale-imagefolder": lambda device: imagefolder_pass(),
    "photo-preprocess": lambda device: preprocess_folder("photos", PHOTO_TARGET),
    "photo-imagefolder": lambda device: imagefolder_pass("photos", PHOTO_TARGET),
    "scale-compaction": lambda device: shard_compaction(),
    "scale-repeat": lambda device: repeated_preprocess(int(os.environ.get("BENCH_REPEATS", "100"))),
    "scale-stream-full": lambda device: streamed_epoch("full"),
    "scale-stream-quarter": lambda device: streamed_epoch("quarter"),
    "fmnist-shards": lambda device: fashion_mnist_shards(),
    "fmnist-memory": lambda device: fashion_mnist(True),
    "fmnist-stream": lambda device: fashion_mnist(False),
}


def _throughput(run: dict) -> str:
    return f"{run['seconds']:.1f} s, {run['samples_per_second']:.0f} images/s; peak memory {run['peak_rss_mb']:.0f} MB"


def _rate(runs: list[dict]) -> float:
    """Images per second over `runs` together."""
    return sum(run["samples_per_second"] * run["seconds"] for run in runs) / sum(
        run["seconds"] for run in runs
    )


def rows(measure, device: str, count: int) -> list[tuple[str, str, str, str]]:
    """The benchmark rows, each measurement in a child process (`measure(name, device)` from bench.py)."""
    prepared = prepare(count)
    print(json.dumps(prepared), file=sys.stderr)
    shutil.rmtree(scale_dir() / "fashion-mnist", ignore_errors=True)
    quarter = measure("scale-preprocess-quarter", device)
    full = measure("scale-preprocess-full", device)
    compaction = measure("scale-compaction", device)
    folder = measure("scale-imagefolder", device)
    stream_quarter = measure("scale-stream-quarter", device)
    stream_full = measure("scale-stream-full", device)
    # In memory, streamed, streamed, in memory (ABBA): this machine's speed drifts by a quarter within minutes.
    measure("fmnist-shards", device)
    first_memory = measure("fmnist-memory", device)
    streams = [measure("fmnist-stream", device), measure("fmnist-stream", device)]
    memories = [first_memory, measure("fmnist-memory", device)]
    repeat = measure("scale-repeat", device)
    photos, photo_folder = measure("photo-preprocess", device), measure("photo-imagefolder", device)
    ours, theirs = full["images"] / full["seconds"], folder["images"] / folder["seconds"]
    photo_ours = photos["images"] / photos["seconds"]
    photo_theirs = photo_folder["images"] / photo_folder["seconds"]
    n, side = f"{count:,}", PHOTO_TARGET
    return [
        (
            f"{n} JPEGs, 128×128 RGB ({prepared['disk_mb']:.0f} MB on disk, {count * 3 * SIZE * SIZE / 1e9:.2f} GB "
            "as uint8): preprocess (library calls, every core)",
            f"{full['seconds']:.1f} s, {ours:.0f} images/s, {full['train_shards']} training shards",
            "",
            f"{ours / theirs:.2f}x the ImageFolder pass",
        ),
        (
            f"A failed image: its shard compacted (the largest training shard, {compaction['images']:,} images, "
            f"{compaction['shard_mb']:.0f} MB, rewritten without it)",
            f"{compaction['seconds']:.2f} s ({compaction['seconds'] / full['seconds']:.0%} of the preprocess)",
            "",
            "",
        ),
        (
            "Same files: torchvision ImageFolder + DataLoader(num_workers=2), decode and resize",
            f"{folder['seconds']:.1f} s, {theirs:.0f} images/s",
            "",
            "1.0x",
        ),
        (
            f"{prepared['photos']:,} JPEGs, {PHOTO_SIZE[0]}×{PHOTO_SIZE[1]} RGB ({prepared['photos_disk_mb']:.0f} MB on "
            f"disk), to {side}×{side}: preprocess (library calls, every core)",
            f"{photos['seconds']:.1f} s, {photo_ours:.0f} images/s; peak memory {photos['peak_rss_mb']:.0f} MB",
            "",
            f"{photo_ours / photo_theirs:.2f}x the ImageFolder pass",
        ),
        (
            "Same files: ImageFolder + DataLoader(num_workers=2), decode and resize",
            f"{photo_folder['seconds']:.1f} s, {photo_theirs:.0f} images/s",
            "",
            "1.0x",
        ),
        (
            f"Peak memory of preprocess: {count // 4:,} / {n} images",
            f"{quarter['peak_rss_mb']:.0f} MB / {full['peak_rss_mb']:.0f} MB",
            "",
            "",
        ),
        (
            f"One streamed training epoch (cnn width 8, batch 64): {count // 4:,} / {n} images "
            f"({stream_quarter['data_mb']:.0f} / {stream_full['data_mb']:.0f} MB of training images)",
            f"{stream_quarter['seconds']:.1f} s / {stream_full['seconds']:.1f} s; peak memory "
            f"{stream_quarter['peak_rss_mb']:.0f} MB / {stream_full['peak_rss_mb']:.0f} MB resident, of it "
            f"anonymous {stream_quarter['peak_anon_mb']:.0f} MB / {stream_full['peak_anon_mb']:.0f} MB",
            "",
            "",
        ),
        (
            f"The preprocess stage {repeat['runs']} times in a row on 2,000 of the JPEGs, -W error::DeprecationWarning",
            f"{repeat['hangs']} hangs; median run {repeat['median_seconds']:.1f} s",
            "",
            "",
        ),
        (
            f"Fashion-MNIST default config, {memories[0]['epochs']} epochs, data in memory (two runs: first and last)",
            " and ".join(_throughput(run) for run in memories),
            f"{memories[0]['test_accuracy']:.4f}",
            "1.0x",
        ),
        (
            "Same, streamed from the shards (`train.data_in_memory: false`; two runs, between those)",
            " and ".join(_throughput(run) for run in streams),
            f"{streams[0]['test_accuracy']:.4f}",
            f"{_rate(streams) / _rate(memories):.0%} of in-memory throughput (the four runs' totals); weights "
            f"{'identical' if len({run['weights_sha256'] for run in streams + memories}) == 1 else 'DIFFER'}",
        ),
    ]
