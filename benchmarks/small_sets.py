"""Small and low-resolution folders: the whole `dvc exp run` of the defaults against a classical baseline.

    python benchmarks/bench.py --small-sets     # these rows alone, with the tutorial measured in the same run

For a small set the reference a practitioner checks first is a classical model on the raw pixels. Each row builds
a folder of real images (scikit-learn's 8x8 digits; Fashion-MNIST test images resized to 8 and 14 pixels; 200
Fashion-MNIST PNGs at their own 28 pixels), runs `dvc exp run` with nothing but the data set and its path set, in
a fresh copy of the repository, then fits scikit-learn's SVC and logistic regression on the very splits the
pipeline stored (the training split; tested on the test split): accuracy and wall time side by side.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from repository import REPO, command_timer, copy_repository, init_repository

# Each set: the arguments of scripts/make_example_folder.py that build it.
SETS = {
    "digits, 8 px (1,797 images)": ["--dataset", "digits", "--test-share", "0.2"],
    "Fashion-MNIST, 8 px (2,000 images)": ["--count", "2000", "--size", "8", "--test-share", "0.2"],
    "Fashion-MNIST, 14 px (2,000 images)": ["--count", "2000", "--size", "14", "--test-share", "0.2"],
    "Fashion-MNIST, 28 px (200 images)": ["--count", "200"],
}


def pipeline_and_baseline(name: str, device: str) -> dict:
    """The whole `dvc exp run` of the defaults on the set `name`, then the classical baselines on its splits."""
    with tempfile.TemporaryDirectory() as scratch:
        repo = copy_repository(Path(scratch) / "repo")
        run = command_timer(repo)

        images = Path(scratch) / "images"  # outside the repository, as a user's folder would be
        sources = ["--source", str(REPO / "data/raw"), "--source", "/usr/share/datasets/fashion-mnist"]
        run(sys.executable, "scripts/make_example_folder.py", "--dest", str(images), *SETS[name], *sources)
        init_repository(run, commit=True)
        overrides = ["-S", "data.dataset=folder", "-S", f"data.path={images}", "-S", f"train.device={device}"]
        seconds = run("dvc", "exp", "run", *overrides)
        train = json.loads((repo / "reports/train/metrics.json").read_text())
        test = json.loads((repo / "reports/evaluate/metrics.json").read_text())
        shape = json.loads((repo / "data/processed/meta.json").read_text())["image_shape"]
        return {
            "seconds": seconds,
            "train_seconds": train["train_seconds"],
            "epochs": train["epochs_trained"],
            "test_accuracy": test["accuracy"],
            "image_shape": shape,
            "baselines": classical_baselines(repo / "data/processed"),
        }


def classical_baselines(processed: Path) -> dict[str, dict[str, float]]:
    """scikit-learn's SVC (RBF kernel) and logistic regression on the raw pixels scaled to 0..1, fitted on the
    stored training split and scored on the stored test split; fit and predict timed together."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    from image_classifier.data import load_split

    def pixels(split: str) -> tuple:
        loaded = load_split(processed / split).in_memory()
        return loaded.images.reshape(len(loaded), -1).numpy() / 255.0, loaded.labels.numpy()

    (train_x, train_y), (test_x, test_y) = pixels("train"), pixels("test")
    results = {}
    for name, model in (("SVC", SVC()), ("logistic regression", LogisticRegression(max_iter=1000))):
        started = time.perf_counter()
        accuracy = float((model.fit(train_x, train_y).predict(test_x) == test_y).mean())
        results[name] = {"test_accuracy": accuracy, "seconds": time.perf_counter() - started}
    return results


MEASUREMENTS = {
    f"small-set:{name}": (lambda device, name=name: pipeline_and_baseline(name, device)) for name in SETS
}


def rows(measure, device: str, tutorial: dict | None) -> list[tuple[str, ...]]:
    """One row per set for the pipeline (against the tutorial's time) and one for its best classical baseline."""
    table = []
    for name in SETS:
        result = measure(f"small-set:{name}", device)
        best_name, best = max(result["baselines"].items(), key=lambda item: item[1]["test_accuracy"])
        ratio = f"{result['seconds'] / tutorial['seconds']:.2f}x the tutorial's time" if tutorial else ""
        gap = 100 * (result["test_accuracy"] - best["test_accuracy"])
        size = "x".join(map(str, result["image_shape"]))
        table.append(
            (
                f"{name}: whole `dvc exp run` of the defaults ({size}, {result['epochs']} epochs, "
                f"{result['train_seconds']:.1f} s of training, overhead "
                f"{result['seconds'] - result['train_seconds']:.1f} s; {gap:+.1f} points against {best_name})",
                f"{result['seconds']:.1f} s",
                f"{result['test_accuracy']:.4f}",
                ratio,
            )
        )
        for baseline, scored in result["baselines"].items():
            table.append(
                (
                    f"{name}: scikit-learn {baseline} on the same splits' pixels",
                    f"{scored['seconds']:.2f} s",
                    f"{scored['test_accuracy']:.4f}",
                    "",
                )
            )
    return table
