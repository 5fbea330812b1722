"""Small, low-resolution folders of real images: the defaults, and nothing else, beat a classical model on the pixels.

For a few thousand images of 8 to 16 pixels the reference a practitioner checks first is scikit-learn on the raw
pixels. The whole pipeline runs with only data.dataset and data.path set; scikit-learn's SVC and logistic
regression are fitted on the very splits the pipeline stored. (Their wall times are the benchmark's business:
`python benchmarks/bench.py --small-sets`.)
"""

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, copy_repo, default_params, run, write_params
from test_pipeline import STAGES, repro

from image_classifier.data import load_split

pytestmark = pytest.mark.slow

# scripts/make_example_folder.py's arguments for each folder: real images, their own test split.
FOLDERS = {
    "digits-8px": ["--dataset", "digits", "--test-share", "0.2"],
    "fashion-14px": ["--count", "2000", "--size", "14", "--test-share", "0.2"],
}
# The defaults may trail the better classical model by at most this much test accuracy.
MARGIN = 0.005


def classical_accuracy(processed: Path) -> float:
    """The better test accuracy of SVC and logistic regression on the stored splits' pixels (0..1)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    def pixels(split: str) -> tuple:
        loaded = load_split(processed / split).in_memory()
        return loaded.images.reshape(len(loaded), -1).numpy() / 255.0, loaded.labels.numpy()

    (train_x, train_y), (test_x, test_y) = pixels("train"), pixels("test")
    return max(
        float((model.fit(train_x, train_y).predict(test_x) == test_y).mean())
        for model in (SVC(), LogisticRegression(max_iter=1000))
    )


@pytest.mark.parametrize("name", list(FOLDERS))
def test_the_defaults_beat_a_classical_baseline_on_a_small_low_resolution_folder(
    name: str, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    sources = ["--source", "/usr/share/datasets/fashion-mnist", "--source", str(REPO / "data/raw")]
    run(
        [sys.executable, "scripts/make_example_folder.py", "--dest", str(images), *FOLDERS[name], *sources],
        REPO,
    )
    repo = copy_repo(tmp_path / "repo")
    raw = default_params()
    raw["data"].update(dataset="folder", path=str(images))
    write_params(repo, raw)
    assert repro(repo) == dict.fromkeys(STAGES, "ran")

    side = json.loads((repo / "data/processed/meta.json").read_text())["image_shape"][-1]
    assert side == (8 if name == "digits-8px" else 14)  # the images' own size: never enlarged
    ours = json.loads((repo / "reports/evaluate/metrics.json").read_text())["accuracy"]
    baseline = classical_accuracy(repo / "data/processed")
    assert ours >= baseline - MARGIN, f"defaults {ours:.4f} against scikit-learn's {baseline:.4f}"
    plan = json.loads((repo / "reports/train/metrics.json").read_text())
    assert plan["epochs_trained"] <= 60


def test_every_stage_has_a_floor_program_and_each_runs() -> None:
    """The benchmark's floor of a small run (each stage's libraries and their first use, on a trivial model)
    must cover the pipeline's stages and still run against the pinned libraries: an API they drop fails here."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench

    assert list(bench.STAGE_FLOORS) == list(STAGES)
    floors = bench.stage_floors(repeats=1)
    assert set(floors) == set(STAGES) and all(seconds > 0 for seconds in floors.values())
