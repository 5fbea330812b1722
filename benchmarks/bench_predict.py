"""Benchmark for `predict` (issue 26): images per second on this machine, PyTorch against ONNX Runtime.

    python benchmarks/bench_predict.py [--images 512] [--batch-size 64] [--timm timm:resnet18] [--timm-size 64]

Stand-alone: random weights (speed does not depend on them), images written to a temporary folder. Two models:
the default CNN (params.yaml's recipe on Fashion-MNIST's 1×28×28) and a timm model (3×size×size, from PNG and
JPEG files of random sizes). Rows, a markdown table with the machine first:
- decoding alone: `read_image` in the threads `predict` uses, files to uint8 arrays;
- the model alone: PyTorch (the .pt model) and ONNX Runtime (the exported .onnx) on decoded batches;
- end to end: decoding and the model overlapped, as `predict --out` runs (startup and imports excluded);
- agreement: largest probability gap between the backends and whether every predicted class agrees.
Then the batch size and layout of forward passes without gradients (evaluate, export's check): PyTorch on 2,000
uint8 images in batches of 1,000 and 64 against what `evaluate.batch_size: auto` picks on a CPU (device.py).
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import cpu_model
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from image_classifier import params as params_module  # noqa: E402
from image_classifier.batch_predict import classify, decode_iter, softmax, to_input  # noqa: E402
from image_classifier.export import example_input, export_onnx, onnx_metadata, save_model  # noqa: E402
from image_classifier.models import build_model, model_config  # noqa: E402
from image_classifier.predictors import Predictor, load_predictor  # noqa: E402

CLASSES = [f"class{i}" for i in range(10)]


def make_models(folder: Path, model: str, image_shape: list[int]) -> dict[str, Predictor]:
    """`model` with random weights as a .pt and an .onnx, loaded the way `predict` loads them."""
    train = params_module.load(REPO / "params.yaml").train.model_copy(
        update={"model": model, "pretrained": ""}
    )
    channels = image_shape[0]
    config, _ = model_config(train, "bench", image_shape, CLASSES, [0.5] * channels, [0.25] * channels)
    torch.manual_seed(0)
    network = build_model(config).eval()
    save_model(folder / "model.pt", config, network.state_dict())
    export_onnx(
        network, example_input(config), folder / "model.onnx", opset=18, metadata=onnx_metadata(config)
    )
    return {
        "torch": load_predictor(str(folder / "model.pt")),
        "onnxruntime": load_predictor(str(folder / "model.onnx")),
    }


def write_images(folder: Path, count: int, grey: bool) -> list[Path]:
    """Files like a user's: PNG and JPEG, sizes 20 to 160 pixels (grey ones for the 28-pixel model)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    files = []
    for index in range(count):
        size = tuple(int(s) for s in rng.integers(20, 160, 2))
        pixels = rng.integers(0, 256, size if grey else (*size, 3), dtype=np.uint8)
        path = folder / f"{index:05d}{'.png' if index % 2 else '.jpg'}"
        Image.fromarray(pixels).save(path)
        files.append(path)
    return files


def rate(count: int, work: Callable[[], object], repeats: int = 3) -> float:
    """Images per second, the best of `repeats` (the machine is shared: the best run is the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return count / best


def bench_model(name: str, predictors: dict[str, Predictor], files: list[Path], batch: int) -> list[str]:
    channels, size, _ = predictors["torch"].image_shape
    decoded = [array for _, array, _ in decode_iter(files, channels, size)]
    batches = [to_input(decoded[start : start + batch]) for start in range(0, len(decoded), batch)]
    rows = [
        f"| {name} | decoding alone ({len(files)} files, threads) | {rate(len(files), lambda: list(decode_iter(files, channels, size))):.0f} |"
    ]
    probabilities = {}
    for backend, predictor in predictors.items():
        predictor.logits(batches[0])  # warm-up: first calls allocate
        model_rate = rate(len(files), lambda p=predictor: [p.logits(b) for b in batches])
        rows.append(f"| {name} | model alone, {backend}, batch {batch} | {model_rate:.0f} |")
        probabilities[backend] = np.concatenate([softmax(predictor.logits(b)) for b in batches])
    names = [str(path) for path in files]
    for backend, predictor in predictors.items():
        end_to_end = rate(
            len(files),
            lambda p=predictor: list(classify(names, decode_iter(files, channels, size), p, batch, 1)),
        )
        rows.append(f"| {name} | end to end (decode + model), {backend} | {end_to_end:.0f} |")
    gap = float(np.abs(probabilities["torch"] - probabilities["onnxruntime"]).max())
    agree = bool((probabilities["torch"].argmax(1) == probabilities["onnxruntime"].argmax(1)).all())
    rows.append(
        f"| {name} | agreement: max probability gap {gap:.1e}, same classes: {'yes' if agree else 'NO'} | |"
    )
    return rows


INFERENCE_MODELS = (
    ("cnn", [1, 28, 28]),
    ("convnet", [1, 28, 28]),
    ("convnet", [3, 64, 64]),
    ("timm:efficientnet_lite0", [1, 96, 96]),
    ("timm:resnet18", [3, 64, 64]),
)


INFERENCE_SETTINGS = ((1000, False), (64, False), (32, True))  # (batch, channels_last); the last is `auto`


def inference_batch_rows(images: int = 2000) -> list[str]:
    """Seconds for `images` through predict_logits in each INFERENCE_SETTINGS, best of three, per model."""
    from image_classifier.device import inference_layout
    from image_classifier.models import build_model, predict_logits

    names = [f"batch {b}{', channels_last' if cl else ''} (s)" for b, cl in INFERENCE_SETTINGS]
    rows = ["", f"| model | {' | '.join(names)} | first / last |", "|---|" + "---|" * (len(names) + 1)]
    for model, shape in INFERENCE_MODELS:
        config = {"model": model, "width": 16, "image_shape": shape, "classes": [str(c) for c in range(10)]}
        data = torch.randint(0, 256, (images, *shape), dtype=torch.uint8)
        seconds = []
        for batch, channels_last in INFERENCE_SETTINGS:
            network = build_model({**config, "mean": [0.5] * shape[0], "std": [0.25] * shape[0]}).eval()
            if channels_last:
                inference_layout(network)
            predict_logits(network, data[: 2 * batch], batch)  # warm-up: the first call of a shape sets it up
            seconds.append(images / rate(images, lambda b=batch, n=network, d=data: predict_logits(n, d, b)))
        label = f"{model} {'×'.join(map(str, shape))}"
        cells = " | ".join(f"{value:.2f}" for value in seconds)
        rows.append(f"| {label} | {cells} | {seconds[0] / seconds[-1]:.1f}x |")
        print(f"done: inference batches, {label}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--timm", default="timm:resnet18")
    parser.add_argument("--timm-size", type=int, default=64)
    args = parser.parse_args()
    cpu = cpu_model() or platform.processor() or "unknown CPU"
    lines = [
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d')}",
        "",
        "| model | what | images/s |",
        "|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        for model, shape, grey in (
            ("cnn", [1, 28, 28], True),
            (args.timm, [3, args.timm_size, args.timm_size], False),
        ):
            predictors = make_models(folder / model.replace(":", "-"), model, shape)
            files = write_images(folder / f"images-{model.replace(':', '-')}", args.images, grey)
            label = f"{model} {'×'.join(map(str, shape))}"
            lines += bench_model(label, predictors, files, args.batch_size)
            print(f"done: {label}", file=sys.stderr)
    lines += inference_batch_rows()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
