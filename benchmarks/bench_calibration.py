"""Calibration on small validation splits: does fitting the temperature help when the validation split is small?

    python benchmarks/bench_calibration.py                       # sizes 100 to 1,600 images, seeds 0 to 2
    python benchmarks/bench_calibration.py --sizes 100 400 --seeds 0

For each size, a folder of that many Fashion-MNIST test images (PNG class folders) goes through the whole
`dvc exp run` of the defaults in a fresh copy of the repository, once per preprocess seed (another validation
split each time). The kept model is then scored on 10,000 images it never saw (the first 10,000 of Fashion-MNIST's
training set) twice: with temperature 1, and with the temperature fitted on its validation split as
calibration.py fits it (fitted here whatever the split's size, since the train stage skips small ones). Prints a
markdown table: the expected calibration error and NLL on those images, raw against fitted, averaged over seeds.
This measurement set `calibration.MIN_CALIBRATION_IMAGES`.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]

from common import cpu_model  # noqa: E402
from make_example_folder import folder_name, read_idx  # noqa: E402
from repository import command_timer, copy_repository, init_repository  # noqa: E402

from image_classifier.batches import split_logits  # noqa: E402
from image_classifier.calibration import calibration_metrics, fit_temperature  # noqa: E402
from image_classifier.data import load_split  # noqa: E402
from image_classifier.datasets import get_dataset  # noqa: E402
from image_classifier.export import load_model  # noqa: E402
from image_classifier.models import predict_logits  # noqa: E402

SOURCES = [REPO / "data/raw", Path("/usr/share/datasets/fashion-mnist")]
HELD_OUT = 10_000


def held_out_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The first HELD_OUT Fashion-MNIST training images (uint8, N×1×28×28) and their labels: the folders are
    built from the test set, so no model here has seen them."""
    spec = get_dataset("fashion-mnist")
    images = read_idx(spec.files["train_images"].name, spec.files["train_images"].sha256, SOURCES)
    labels = read_idx(spec.files["train_labels"].name, spec.files["train_labels"].sha256, SOURCES)
    return torch.from_numpy(images[:HELD_OUT].copy())[:, None], torch.from_numpy(
        labels[:HELD_OUT].astype("int64")
    )


def score_run(repo: Path, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The run's kept model on the held-out images: raw (temperature 1) and with the temperature fitted on its
    validation split."""
    model, config = load_model(repo / "models/model.pt")
    model.set_temperature(1.0)
    val = load_split(repo / "data/processed/val")
    with torch.no_grad():
        temperature = fit_temperature(split_logits(model, val, 256), val.labels)
        raw = predict_logits(model, images, 1000)
    class_names = get_dataset("fashion-mnist").classes
    order = torch.tensor([config["classes"].index(folder_name(name)) for name in class_names])
    target = order[labels]  # Fashion-MNIST's label numbers in the folder's (sorted) class order
    return {
        "val_images": len(val),
        "temperature": temperature,
        "raw": calibration_metrics(raw, target),
        "fitted": calibration_metrics(raw / temperature, target),
    }


def measure(sizes: list[int], seeds: list[int]) -> dict[int, list[dict]]:
    images, labels = held_out_images()
    results: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        repo = copy_repository(Path(scratch) / "repo")
        run = command_timer(repo)
        init_repository(run, commit=True)
        for size in sizes:
            folder = Path(scratch) / f"images-{size}"
            sources = [arg for source in SOURCES for arg in ("--source", str(source))]
            run(
                sys.executable,
                "scripts/make_example_folder.py",
                "--dest",
                str(folder),
                "--count",
                str(size),
                *sources,
            )
            for seed in seeds:
                settings = ["data.dataset=folder", f"data.path={folder}", f"preprocess.seed={seed}"]
                run("dvc", "exp", "run", *[arg for setting in settings for arg in ("-S", setting)])
                results.setdefault(size, []).append(score_run(repo, images, labels))
                print(f"{size} images, seed {seed}: {json.dumps(results[size][-1])}", file=sys.stderr)
    return results


def table(results: dict[int, list[dict]]) -> str:
    def mean(runs: list[dict], when: str, key: str) -> float:
        return sum(run[when][key] for run in runs) / len(runs)

    lines = [
        "| Folder (validation images) | Runs | ECE raw -> fitted | NLL raw -> fitted | Runs the fit lowered ECE |",
        "|---|---|---|---|---|",
    ]
    for size, runs in results.items():
        better = sum(run["fitted"]["ece"] < run["raw"]["ece"] for run in runs)
        lines.append(
            f"| {size} images ({runs[0]['val_images']}) | {len(runs)} "
            f"| {mean(runs, 'raw', 'ece'):.3f} -> {mean(runs, 'fitted', 'ece'):.3f} "
            f"| {mean(runs, 'raw', 'nll'):.3f} -> {mean(runs, 'fitted', 'nll'):.3f} | {better} of {len(runs)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 150, 200, 300, 400, 800, 1600])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    print(f"{cpu_model()}, commit {commit.stdout.strip()}, {HELD_OUT} held-out images")
    print(table(measure(args.sizes, args.seeds)))


if __name__ == "__main__":
    main()
