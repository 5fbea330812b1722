"""Speed benchmark: our train path against the PyTorch quickstart as its tutorial writes it.

    make bench                      # or: python benchmarks/bench.py [--skip-tutorial] [--rounds 3]
    python benchmarks/bench.py --data-scale    # opt-in: data bigger than memory (benchmarks/data_scale.py)
    python benchmarks/bench.py --gpu --data data/raw [--out table.md]   # the GPU table (README: On a GPU)

Prints a markdown table. Every measurement runs in a fresh child process (same start-up for each, and the
child's peak memory is read from the OS; the GPU mode runs in one process, see its section below); run it on an
otherwise idle machine: other load distorts timings.
The tutorial and the recipe rows it is compared with run in interleaved rounds and report the median round, so
a machine that speeds up or slows down during the run moves both sides of the ratio alike.
Needs the fetched data (data/raw, from `dvc repro fetch`) and, for the no-op repro row, a finished `dvc repro`.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import data_scale
import small_sets
from repository import REPO, command_timer, copy_repository

THRESHOLDS = (0.90, 0.91, 0.92)


def quickstart_model(device) -> tuple:
    """The quickstart's model (seeded), loss and optimiser, as its tutorial writes them."""
    import torch
    from torch import nn

    from image_classifier.models import QuickstartMLP

    torch.manual_seed(0)
    model = QuickstartMLP((1, 28, 28), 10).to(device)
    return model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=1e-3)


def quickstart_tutorial(device_name: str, raw_dir: Path = REPO / "data/raw", limit: int = 0) -> dict:
    """The "Learn the Basics" quickstart, as written: torchvision dataset, ToTensor, DataLoader(batch_size=64).
    With `limit`, on the same stratified subsets as the GPU mode's other rows (limited())."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    root = Path(tempfile.mkdtemp()) / "FashionMNIST" / "raw"
    root.mkdir(parents=True)
    # torchvision reads the decompressed IDX files from <root>/raw
    for file in Path(raw_dir).resolve().iterdir():
        (root / file.name).symlink_to(file)
    training_data = datasets.FashionMNIST(
        root=root.parent.parent, train=True, download=False, transform=ToTensor()
    )
    test_data = datasets.FashionMNIST(
        root=root.parent.parent, train=False, download=False, transform=ToTensor()
    )
    if limit:
        training_data = Subset(training_data, limited(training_data.targets, limit).tolist())
        test_data = Subset(test_data, limited(test_data.targets, limit).tolist())
    train_dataloader = DataLoader(training_data, batch_size=64)
    test_dataloader = DataLoader(test_data, batch_size=64)
    device = torch.device(device_name)
    model, loss_fn, optimizer = quickstart_model(device)
    started = time.perf_counter()
    for _ in range(5):
        model.train()
        for images, labels in train_dataloader:
            images, labels = images.to(device), labels.to(device)
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test_dataloader:
                images, labels = images.to(device), labels.to(device)
                correct += (model(images).argmax(1) == labels).sum().item()
    return {"seconds": time.perf_counter() - started, "test_accuracy": correct / len(test_data)}


class StopTraining(Exception):
    """Raised by a ValidationProbe to end a run early: its target reached, or its time spent."""


class ValidationProbe:
    """Validation accuracy every few optimiser steps, with the clock stopped while it measures, so "seconds
    until 91%" is training time only and not rounded up to the end of an epoch. The GPU mode feeds it the test
    split, probes every `every` steps when given, and stops the run (StopTraining) once accuracy reaches
    `stop_at` or training time passes `stop_after` seconds."""

    def __init__(
        self,
        images,
        labels,
        device,
        every: int | None = None,
        stop_at: float | None = None,
        stop_after: float | None = None,
    ) -> None:
        self.images, self.labels, self.device = images.to(device), labels.to(device), device
        self.every, self.stop_at, self.stop_after = every, stop_at, stop_after
        self.started = time.perf_counter()
        self.paused = 0.0
        self.points: list[tuple[float, int, float]] = []  # (training seconds, step, validation accuracy)

    def due(self, step: int) -> bool:
        if self.every:
            return step % self.every == 0
        # Dense early, where accuracy climbs fastest; then every 25 steps (~6,400 images at batch 256).
        return step % 5 == 0 if step <= 100 else step % 25 == 0

    def __call__(self, step: int, model) -> None:
        if not self.due(step):
            return
        from image_classifier.models import predict_logits

        self.synchronize()
        now = time.perf_counter()
        logits = predict_logits(model, self.images, 1000)
        accuracy = (logits.argmax(1) == self.labels).float().mean().item()
        self.points.append((now - self.started - self.paused, step, accuracy))
        self.paused += time.perf_counter() - now
        if (self.stop_at is not None and accuracy >= self.stop_at) or (
            self.stop_after is not None and self.points[-1][0] > self.stop_after
        ):
            raise StopTraining

    def training_seconds(self) -> float:
        self.synchronize()
        return time.perf_counter() - self.started - self.paused

    def synchronize(self) -> None:
        import torch

        if self.device.type != "cpu":
            torch.accelerator.synchronize()


def our_train(
    overrides: dict, device_name: str, val_size: int, probe: bool = False, normalise: bool = True
) -> dict:
    """Our train loop (the train stage's library call) with `overrides` on params.yaml; per-epoch history,
    with `probe` validation accuracy every few steps, without `normalise` raw 0..1 inputs as the tutorial's."""
    import torch
    import yaml

    from image_classifier import params as params_module
    from image_classifier.data import channel_stats, decode_idx, stratified_indices
    from image_classifier.datasets import get_dataset
    from image_classifier.device import set_threads
    from image_classifier.models import model_config, predict_logits
    from image_classifier.train import train

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(overrides, device=device_name)
    params = params_module.from_dict(raw)
    set_threads(params.train.threads)
    spec = get_dataset(params.data.dataset)
    splits = decode_idx(REPO / "data/raw", spec)
    rest, val_index = stratified_indices(splits["train"].labels, val_size, seed=0)
    train_split, val_split = splits["train"].subset(rest), splits["train"].subset(val_index)
    mean, std = channel_stats(train_split.images)
    config, _ = model_config(
        params.train,
        spec.name,
        list(spec.image_shape),
        list(spec.classes),
        mean if normalise else [0.0],
        std if normalise else [1.0],
    )
    device = torch.device(device_name)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        probe_hook = ValidationProbe(val_split.images, val_split.labels, device) if probe else None
        result = train(
            params.train,
            config,
            train_split,
            val_split,
            device,
            Path(scratch) / "resume.pt",
            on_step=probe_hook,
        )
        seconds = probe_hook.training_seconds() if probe_hook else time.perf_counter() - started
    from image_classifier.models import build_model

    model = build_model(config).to(device)
    model.load_state_dict(result.best_state)
    test = splits["test"]
    logits = predict_logits(model, test.images.to(device), 1000)
    accuracy = (logits.argmax(1).cpu() == test.labels).float().mean().item()
    return {
        "seconds": seconds,
        "test_accuracy": accuracy,
        "history": result.history,
        "compile_seconds": result.compile_seconds,
        "probes": probe_hook.points if probe_hook else [],
        "steps_per_epoch": result.plan.steps_per_epoch,
    }


def bare_recipe(device_name: str) -> dict:
    """The tutorial's arithmetic alone: its model, loss, optimiser, batch and epochs over batches sliced from one
    float tensor, in the tutorial's order, with nothing else in the loop (no augmentation, no bookkeeping, no
    test pass). No loop that trains this recipe can be faster: it bounds the recipe rows' ratio."""
    import torch

    from image_classifier.data import decode_idx
    from image_classifier.datasets import get_dataset

    splits = decode_idx(REPO / "data/raw", get_dataset("fashion-mnist"))
    device = torch.device(device_name)
    images = splits["train"].images.to(device).float().div_(255)
    labels = splits["train"].labels.to(device)
    model, loss_fn, optimizer = quickstart_model(device)
    started = time.perf_counter()
    for _ in range(5):
        for start in range(0, len(labels), 64):
            loss = loss_fn(model(images[start : start + 64]), labels[start : start + 64])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        test = splits["test"]
        predicted = model(test.images.to(device).float().div_(255)).argmax(1).cpu()
    return {"seconds": seconds, "test_accuracy": (predicted == test.labels).float().mean().item()}


def preprocess_all() -> dict:
    """The preprocess stage's library call on all 70,000 images, without interpreter start-up."""
    from image_classifier import params as params_module
    from image_classifier.data import decode, preprocess
    from image_classifier.datasets import get_dataset

    params = params_module.load(REPO / "params.yaml")
    spec = get_dataset(params.data.dataset)
    with tempfile.TemporaryDirectory() as out:
        files = {name: Path(out) / name for name in ("train", "val", "test")}
        started = time.perf_counter()
        preprocess(
            spec.name,
            list(spec.classes),
            decode(REPO / "data/raw", spec),
            params.preprocess,
            files,
            Path(out) / "meta.json",
            Path(out) / "samples.png",
        )
        return {"seconds": time.perf_counter() - started}


def limited(labels, limit: int):
    """Indices of a stratified `limit` of a split (all of them when it has no more)."""
    import torch

    from image_classifier.data import stratified_indices

    if not limit or limit >= len(labels):
        return torch.arange(len(labels))
    return stratified_indices(torch.as_tensor(labels), limit, seed=0)[1]


STAGE_NAMES = ("fetch", "preprocess", "train", "evaluate", "export")


def small_folder_pipeline(device_name: str, count: int = 200) -> dict:
    """`dvc repro` with the defaults on a folder of `count` real photos-as-PNGs (Fashion-MNIST test images), in a
    fresh copy of the repository: the whole wall time against the training time it contains, then each stage's
    process alone (start-up included) on the same data."""
    with tempfile.TemporaryDirectory() as scratch:
        repo = copy_repository(Path(scratch) / "repo")
        command = command_timer(repo)

        command("git", "init", "-q")
        command("dvc", "init", "-q", "-f")
        sources = ["--source", str(REPO / "data/raw"), "--source", "/usr/share/datasets/fashion-mnist"]
        command(sys.executable, "scripts/make_example_folder.py", "--count", str(count), *sources)
        params = (repo / "params.yaml").read_text()
        params = params.replace("  dataset: fashion-mnist ", "  dataset: folder        ", 1)
        (repo / "params.yaml").write_text(params.replace("  device: auto ", f"  device: {device_name:<5}", 1))
        wall = command("dvc", "repro")
        train = json.loads((repo / "reports/train/metrics.json").read_text())
        test = json.loads((repo / "reports/evaluate/metrics.json").read_text())
        stages = {name: command(sys.executable, f"stages/{name}.py") for name in STAGE_NAMES}
    return {
        "seconds": wall,
        "train_seconds": train["train_seconds"],
        "epochs": train["epochs_trained"],
        "test_accuracy": test["accuracy"],
        "stage_seconds": stages,
    }


# The tutorial's recipe exactly, through our data path and train loop (no validation split: the same 60,000
# training images the tutorial uses).
QUICKSTART_RECIPE = {
    "model": "mlp",
    "optimizer": "sgd",
    "lr": 1e-3,
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "schedule": "none",
    "label_smoothing": 0.0,
    "crop_padding": 0,
    "flip": False,
    "test_time_flip": False,
    "batch_size": 64,
    "epochs": 5,
    "ema": False,
}

SHORT = {"epochs": 7}
SHORT_FLAGS = " ".join(f"-S train.{key}={value}" for key, value in SHORT.items())

MEASUREMENTS = {
    "tutorial": lambda device: quickstart_tutorial(device),
    "recipe": lambda device: our_train({**QUICKSTART_RECIPE, "precision": "fp32"}, device, val_size=0),
    "recipe-bf16": lambda device: our_train({**QUICKSTART_RECIPE, "precision": "bf16"}, device, val_size=0),
    # The tutorial feeds raw 0..1 pixels; our model normalises them, which alone lifts accuracy.
    "recipe-raw": lambda device: our_train(
        {**QUICKSTART_RECIPE, "precision": "fp32"}, device, val_size=0, normalise=False
    ),
    "recipe-floor": lambda device: bare_recipe(device),
    "default": lambda device: our_train({}, device, val_size=5000, probe=True),
    # A shorter one-cycle schedule (7 epochs instead of 12): what a tighter time budget buys.
    "short": lambda device: our_train(SHORT, device, val_size=5000),
    "short-compiled": lambda device: our_train({**SHORT, "compile": "default"}, device, val_size=5000),
    "preprocess": lambda device: preprocess_all(),
    "small-folder": lambda device: small_folder_pipeline(device),
    **data_scale.MEASUREMENTS,
    **small_sets.MEASUREMENTS,
}


def measure(name: str, device: str) -> dict:
    """Run one measurement in a child process; add that child's peak resident memory."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", name, "--device", device],
            stdout=out,
            stderr=err,
            cwd=REPO,
            text=True,
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the running maximum
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"benchmark {name} failed:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


def median_round(rounds: list[dict[str, dict]], name: str) -> dict:
    """The round of `name` with the median time (the lower middle one for an even count), with every round's
    time kept in "round_seconds" to show the spread."""
    ordered = sorted((round_[name] for round_ in rounds), key=lambda result: result["seconds"])
    return {
        **ordered[(len(ordered) - 1) // 2],
        "round_seconds": [round_[name]["seconds"] for round_ in rounds],
    }


def time_command(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - started


def first_reaching(result: dict, threshold: float) -> str:
    for seconds, step, accuracy in result["probes"]:
        if accuracy >= threshold:
            return f"{seconds:.1f} s (epoch {step / result['steps_per_epoch']:.2f})"
    return "not reached"


def machine(device: str) -> str:
    """The device, and for a CPU its model, vector extensions, threads and the precision `auto` picks."""
    import torch

    from image_classifier.device import autocast_dtype

    if device == "cuda":
        return f"Device: cuda ({torch.cuda.get_device_name()})"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "")
    flags = set(
        next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    )
    extensions = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    precision = "bf16" if autocast_dtype(torch.device("cpu"), "auto") else "fp32"
    return (
        f"Device: cpu ({model or platform.processor() or platform.machine()}; {', '.join(extensions) or 'no AVX2'}; "
        f"{torch.get_num_threads()} threads; precision auto = {precision})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--skip-tutorial", action="store_true", help="skip the slow tutorial row")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of the tutorial and fp32 recipe rows (default 3)"
    )
    parser.add_argument("--data-scale", action="store_true", help="only the data-bigger-than-memory rows")
    parser.add_argument(
        "--small-sets",
        action="store_true",
        help="only the small-folder rows (with the tutorial, for the ratio)",
    )
    parser.add_argument("--scale-images", type=int, default=50_000, help="JPEGs to generate (--data-scale)")
    parser.add_argument(
        "--scale-dir", default="/var/tmp/bench-scale", help="where --data-scale keeps its folder and shards"
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU table, in one process, on a bare machine with torch (README: On a GPU); --device cpu "
        "runs its code path on a subset",
    )
    parser.add_argument("--data", default=str(REPO / "data/raw"), help="--gpu: the four IDX files' folder")
    parser.add_argument(
        "--limit",
        type=int,
        default=0,
        help="--gpu: train and test on a stratified N images of each split, every row cut short (--device cpu: "
        "1,000 unless given)",
    )
    parser.add_argument("--out", help="--gpu: also write the table to this file, row by row")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpu:
        import bench_gpu  # here: it imports this module

        bench_gpu.main(args)
        return
    os.environ.setdefault("BENCH_SCALE_DIR", args.scale_dir)  # the children read it
    if args.child:
        print(json.dumps(MEASUREMENTS[args.child](args.device)))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (REPO / "data/raw").is_dir():
        raise SystemExit("data/raw is missing: run `dvc repro fetch` (or `make repro`) first")
    if args.data_scale:
        Path(args.scale_dir).mkdir(parents=True, exist_ok=True)
        print_table(device, data_scale.rows(measure, device, args.scale_images), compared="Compared")
        return
    if args.small_sets:
        tutorial = None if args.skip_tutorial else measure("tutorial", device)
        rows = (
            [("Quickstart tutorial as written", f"{tutorial['seconds']:.1f} s", "", "1.0x")]
            if tutorial
            else []
        )
        print_table(device, rows + small_sets.rows(measure, device, tutorial), compared="Compared")
        return
    rows = []
    compared = ("recipe", "recipe-raw") if args.skip_tutorial else ("tutorial", "recipe", "recipe-raw")
    rounds = [{name: measure(name, device) for name in compared} for _ in range(max(1, args.rounds))]
    tutorial = None if args.skip_tutorial else median_round(rounds, "tutorial")
    recipe, recipe_raw = median_round(rounds, "recipe"), median_round(rounds, "recipe-raw")
    recipe_bf16 = measure("recipe-bf16", device)
    floor = measure("recipe-floor", device)
    default = measure("default", device)
    short = measure("short", device)
    short_compiled = measure("short-compiled", device)
    preprocess = measure("preprocess", device)

    def vs_tutorial(seconds: float) -> str:
        if not tutorial:
            return "n/a"
        ratio = tutorial["seconds"] / seconds
        return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"

    def spread(result: dict) -> str:
        times = result["round_seconds"]
        return f" (rounds: {', '.join(f'{t:.1f}' for t in times)})" if len(times) > 1 else ""

    def vs_tutorial_by_round(result: dict) -> str:
        """The ratio of the medians, and the range of the ratios within each round."""
        if not tutorial:
            return "n/a"
        ratios = [t / r for t, r in zip(tutorial["round_seconds"], result["round_seconds"], strict=True)]
        detail = f" (rounds {min(ratios):.1f}-{max(ratios):.1f}x)" if len(ratios) > 1 else ""
        return vs_tutorial(result["seconds"]) + detail

    if tutorial:
        rows.append(
            (
                "Quickstart tutorial as written (DataLoader, MLP, SGD 1e-3, batch 64, 5 epochs)",
                f"{tutorial['seconds']:.1f} s{spread(tutorial)}",
                f"{tutorial['test_accuracy']:.4f}",
                "1.0x",
            )
        )
    for label, result in (
        ("fp32, raw 0..1 inputs as the tutorial's", recipe_raw),
        ("fp32, our normalised inputs", recipe),
    ):
        rows.append(
            (
                f"Same recipe through our train loop ({label})",
                f"{result['seconds']:.1f} s{spread(result)}",
                f"{result['test_accuracy']:.4f}",
                vs_tutorial_by_round(result),
            )
        )
    rows.append(
        (
            "Same recipe through our train loop (bf16 autocast, normalised inputs; one round)",
            f"{recipe_bf16['seconds']:.1f} s",
            f"{recipe_bf16['test_accuracy']:.4f}",
            vs_tutorial(recipe_bf16["seconds"]),
        )
    )
    rows.append(
        (
            "Same recipe, its arithmetic alone (model, loss, SGD over sliced batches; nothing else; one round): "
            "the fastest any loop can train it",
            f"{floor['seconds']:.1f} s",
            f"{floor['test_accuracy']:.4f}",
            vs_tutorial(floor["seconds"]),
        )
    )
    history = default["history"]
    target = tutorial["test_accuracy"] if tutorial else 0.65
    reached = first_reaching(default, target)
    rows.append(
        (
            f"Default config: to the tutorial's accuracy ({target:.4f}) on validation",
            reached,
            "",
            vs_tutorial(float(reached.split()[0])) if reached != "not reached" else "",
        )
    )
    for threshold in THRESHOLDS:
        rows.append(
            (
                f"Default config: to {threshold:.0%} validation accuracy",
                first_reaching(default, threshold),
                "",
                "",
            )
        )
    rows.append(
        (
            f"Default config: all {len(history)} epochs, test accuracy",
            f"{default['seconds']:.1f} s",
            f"{default['test_accuracy']:.4f}",
            "",
        )
    )
    rows.append(
        (
            f"Short schedule (`{SHORT_FLAGS}`): training time, test accuracy",
            f"{short['seconds']:.1f} s",
            f"{short['test_accuracy']:.4f}",
            "",
        )
    )
    rows.append(
        (
            "Same short schedule with `-S train.compile=default`: training time (compile time apart)",
            f"{short_compiled['seconds'] - short_compiled['compile_seconds']:.1f} s "
            f"(+ {short_compiled['compile_seconds']:.1f} s compile)",
            f"{short_compiled['test_accuracy']:.4f}",
            "",
        )
    )
    rows.append(
        ("Preprocess all 70,000 images (library call, no start-up)", f"{preprocess['seconds']:.2f} s", "", "")
    )
    rows.append(
        (
            "Preprocess stage, whole process (`python stages/preprocess.py`)",
            f"{time_command([sys.executable, 'stages/preprocess.py']):.1f} s",
            "",
            "",
        )
    )
    if (REPO / "dvc.lock").is_file():
        env_bin = str(Path(sys.executable).parent)
        os.environ["PATH"] = f"{env_bin}:{os.environ['PATH']}"
        time_command(["dvc", "repro"])  # brings the workspace up to date if it was not
        rows.append(("No-op `dvc repro`", f"{time_command(['dvc', 'repro']):.2f} s", "", ""))
    rows.append(("Peak memory of the default training process", f"{default['peak_rss_mb']:.0f} MB", "", ""))
    folder = measure("small-folder", device)
    overhead = folder["seconds"] - folder["train_seconds"]
    rows.append(
        (
            "200-image folder, defaults: whole `dvc repro` (of which training; overhead, target <= 10 s)",
            f"{folder['seconds']:.1f} s ({folder['train_seconds']:.1f} s, {folder['epochs']} epochs; "
            f"overhead {overhead:.1f} s)",
            f"{folder['test_accuracy']:.4f}",
            "",
        )
    )
    rows.append(
        (
            "200-image folder: each stage's process alone, start-up included",
            ", ".join(f"{name} {seconds:.1f} s" for name, seconds in folder["stage_seconds"].items()),
            "",
            "",
        )
    )

    rows += small_sets.rows(measure, device, tutorial)
    print_table(device, rows)


def table_header(device: str, columns: tuple[str, ...]) -> list[str]:
    """The machine line (device, torch version, date) and the markdown table's heading."""
    import torch

    return [
        f"{machine(device)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]


def table_row(cells: tuple[str, ...]) -> str:
    return "| " + " | ".join(cells) + " |"


def print_table(device: str, rows: list[tuple[str, ...]], compared: str = "vs tutorial") -> None:
    print("\n" + "\n".join(table_header(device, ("Measurement", "Time", "Test accuracy", compared))))
    for row in rows:
        print(table_row(row))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
