"""What the benchmarks share: the PyTorch quickstart as its tutorial writes it and the recipe that copies it, the
probe that times training with the clock stopped while it measures, a fresh process per measurement, and the
markdown table headed by a description of the machine.

Only the standard library at module level: bench_gpu.py runs on a bare machine (torch, torchvision, numpy,
PyYAML), and the scripts put src/ on sys.path only when they run, so image_classifier is imported where used.
"""

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from repository import REPO

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


def train_flags(overrides: dict) -> str:
    """`overrides` as the `dvc exp run` flags that set them (`-S train.epochs=7 ...`), for a row's label."""
    return " ".join(f"-S train.{key}={value}" for key, value in overrides.items())


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


def limited(labels, limit: int):
    """Indices of a stratified `limit` of a split (all of them when it has no more)."""
    import torch

    from image_classifier.data import stratified_indices

    if not limit or limit >= len(labels):
        return torch.arange(len(labels))
    return stratified_indices(torch.as_tensor(labels), limit, seed=0)[1]


def train_and_score(train_params, dataset: str, classes: list[str], splits: dict, device) -> dict:
    """The train stage's library calls on `splits` ("train", "test": uint8 Splits) in this process: hold out
    preprocess's `auto` validation share (stratified, seed 0), train with `train_params` (pretrained weights
    resolved as model_config does), score the kept weights on the test split. `train_params` may be TrainParams
    or bench_gpu's plain namespace (no pydantic there). Returns test accuracy, training seconds and epochs."""
    from image_classifier.data import channel_stats, split_size, stratified_indices
    from image_classifier.device import inference_batch_size
    from image_classifier.models import build_model, model_config, predict_logits
    from image_classifier.train import train

    labels = splits["train"].labels
    rest, held = stratified_indices(labels, split_size("val_size", "auto", len(labels)), 0, min_per_class=1)
    train_split, val_split = splits["train"].subset(rest), splits["train"].subset(held)
    mean, std = channel_stats(train_split.images)
    shape = list(train_split.images.shape[1:])
    config, weights = model_config(train_params, dataset, shape, classes, mean, std)
    with tempfile.TemporaryDirectory() as scratch:
        result = train(
            train_params, config, train_split, val_split, device, Path(scratch) / "r.pt", pretrained=weights
        )
    network = build_model(config).to(device).eval()
    network.load_state_dict(result.best_state)
    test = splits["test"]
    logits = predict_logits(network, test.images.to(device), inference_batch_size(device))
    return {
        "train_seconds": sum(row["epoch_seconds"] for row in result.history),
        "test_accuracy": (logits.argmax(1).cpu() == test.labels).float().mean().item(),
        "epochs": len(result.history),
        "planned": result.plan.epochs,
        "image_size": shape[-1],
        "best_val": result.best_val_accuracy,
    }


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
        from image_classifier.device import synchronize
        from image_classifier.models import predict_logits

        synchronize(self.device)
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
        from image_classifier.device import synchronize

        synchronize(self.device)
        return time.perf_counter() - self.started - self.paused


def preprocess_fashion_mnist(out: Path) -> float:
    """The preprocess stage's library call on all 70,000 Fashion-MNIST images from data/raw, its splits stored in
    `out`; returns its seconds (no interpreter start-up)."""
    from image_classifier import params as params_module
    from image_classifier.datasets import get_dataset
    from image_classifier.preprocess import preprocess
    from image_classifier.raw_formats import decode

    params = params_module.load(REPO / "params.yaml")
    spec = get_dataset("fashion-mnist")
    files = {name: out / name for name in ("train", "val", "test")}
    started = time.perf_counter()
    preprocess(
        spec.name,
        list(spec.classes),
        decode(REPO / "data/raw", spec),
        params.preprocess,
        files,
        out / "meta.json",
        out / "samples.png",
    )
    return time.perf_counter() - started


def run_child(command: list[str], name: str) -> tuple[dict, float]:
    """Run one measurement in a fresh process (same start-up for each): the JSON on its last line of output, and
    its peak resident memory in MB. A failure ends the benchmark with the end of the child's stderr."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the running maximum
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"benchmark {name} failed:\n{err.read()[-3000:]}")
        return json.loads(out.read().strip().splitlines()[-1]), usage.ru_maxrss / 1024


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where it gives none)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "")


def machine(device: str) -> str:
    """The device, and for a CPU its model, vector extensions, threads and the precision `auto` picks."""
    import torch

    from image_classifier.device import autocast_dtype

    if device == "cuda":
        return f"Device: cuda ({torch.cuda.get_device_name()})"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(
        next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    )
    extensions = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    precision = "bf16" if autocast_dtype(torch.device("cpu"), "auto") else "fp32"
    return (
        f"Device: cpu ({cpu_model() or platform.processor() or platform.machine()}; "
        f"{', '.join(extensions) or 'no AVX2'}; {torch.get_num_threads()} threads; precision auto = {precision})"
    )


def table_header(device: str, columns: tuple[str, ...]) -> list[str]:
    """The machine line (device, torch version, date) and the markdown table's heading."""
    import torch

    return [
        f"{machine(device)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]


def table_row(cells: tuple[str, ...] | list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
