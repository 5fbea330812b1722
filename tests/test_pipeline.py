"""End to end: `dvc repro` in a fresh copy of the repository, on a real-data subset (one short epoch).

Checks every output, then the caching facts: a second repro runs nothing, a train param reruns train and what
follows, an evaluate param reruns only evaluate, and reverting a param restores outputs from the run cache.
"""

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import FASHION_DIR, copy_repo, default_params, run, write_params
from PIL import Image

from image_classifier.data import load_split
from image_classifier.export import PARITY_IMAGES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make setup)"),
]
STAGES = ("fetch", "preprocess", "train", "evaluate", "export")


def subset_params() -> dict:
    raw = default_params()
    raw["preprocess"].update(val_size=1000, train_subset=3000)
    raw["train"].update(epochs=1, width=8, batch_size=128, lr=0.05)
    return raw


def repro(repo: Path) -> dict[str, str]:
    """Run `dvc repro`; return what happened to each stage: ran, cached (run cache) or skipped."""
    output = run(["dvc", "repro"], cwd=repo).stdout
    outcome = {}
    for stage in STAGES:
        if re.search(rf"Running stage '{stage}'", output):
            outcome[stage] = "ran"
        elif re.search(rf"Stage '{stage}' is cached", output):
            outcome[stage] = "cached"
        else:
            outcome[stage] = "skipped"
    return outcome


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("pipeline"))
    write_params(repo, subset_params())
    assert repro(repo) == dict.fromkeys(STAGES, "ran")
    return repo


def test_every_output_is_written(repo: Path) -> None:
    for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert (repo / "data/raw" / name).is_file()
    meta = json.loads((repo / "data/processed/meta.json").read_text())
    assert meta["sizes"] == {"train": 3000, "val": 1000, "test": 10000}
    assert meta["classes"][9] == "Ankle boot"
    for png in (
        "reports/preprocess/samples.png",
        "reports/train/curves.png",
        "reports/evaluate/confusion.png",
        "reports/evaluate/misclassified.png",
        "reports/evaluate/reliability.png",
    ):
        assert (repo / png).read_bytes()[:4] == b"\x89PNG", png
    history = list(csv.DictReader((repo / "reports/train/history.csv").open()))
    assert [row["epoch"] for row in history] == ["1"]
    train_metrics = json.loads((repo / "reports/train/metrics.json").read_text())
    assert 0.5 < train_metrics["best_val_accuracy"] <= 1
    # Calibrated on the validation split after training: the fit can only lower its NLL.
    assert train_metrics["calibration.val_nll_after"] <= train_metrics["calibration.val_nll_before"]
    test_metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert 0.5 < test_metrics["accuracy"] <= 1 and 0 < test_metrics["macro_f1"] <= 1
    assert 0 <= test_metrics["ece"] < 0.1 and 0 < test_metrics["brier"] < 1
    assert test_metrics["nll"] == pytest.approx(test_metrics["loss"], rel=1e-5)
    assert set(test_metrics["per_class"]) == set(meta["classes"])
    assert len(list(csv.DictReader((repo / "reports/evaluate/predictions.csv").open()))) == 10000
    export = json.loads((repo / "reports/export/metrics.json").read_text())
    assert export["onnx_checked_images"] == PARITY_IMAGES  # of the 10,000, evenly spaced
    assert export["onnx_max_abs_logit_diff"] <= 1e-4
    assert export["onnx_prediction_agreement"] == 1.0
    weights = torch.load(repo / "models/export/weights.pt", weights_only=True)
    assert "network.head.weight" in weights
    assert weights["temperature"].item() == pytest.approx(train_metrics["calibration.temperature"])
    for name in ("model.onnx", "model.pt2", "config.json"):
        assert (repo / "models/export" / name).stat().st_size > 0
    assert not list((repo / "data/resume").glob("*.pt")), "scratch checkpoint removed after training"
    assert "run_id" in json.loads((repo / "reports/train/mlflow_run.json").read_text())
    shown = run(["dvc", "metrics", "show", "--json"], cwd=repo).stdout
    assert "best_val_accuracy" in shown and "macro_f1" in shown


def test_predict_classifies_a_png_of_a_test_image(repo: Path) -> None:
    rows = list(csv.DictReader((repo / "reports/evaluate/predictions.csv").open()))
    index = next(i for i, row in enumerate(rows) if row["actual"] == row["predicted"])
    test = load_split(repo / "data/processed/test")
    Image.fromarray(test.images[index][0].numpy()).save(repo / "test-image.png")
    output = run(["predict", "test-image.png", "--index", str(index)], cwd=repo).stdout.splitlines()
    assert output[0].startswith(f'test-image.png: Predicted: "{rows[index]["actual"]}" (')
    assert output[1].endswith(f'Actual: "{rows[index]["actual"]}"')
    top = run(["predict", "--top", "3", "--index", str(index)], cwd=repo).stdout.splitlines()
    assert top[0] == f'test[{index}]: top 3 of 10 classes, Actual: "{rows[index]["actual"]}"'
    assert top[1].startswith(f'  1. "{rows[index]["actual"]}" (') and len(top) == 4


def test_second_repro_runs_nothing(repo: Path) -> None:
    assert repro(repo) == dict.fromkeys(STAGES, "skipped")


def test_param_changes_rerun_only_what_they_affect(repo: Path) -> None:
    raw = subset_params()
    raw["train"]["lr"] = 0.02
    write_params(repo, raw)
    assert repro(repo) == {
        "fetch": "skipped",
        "preprocess": "skipped",
        "train": "ran",
        "evaluate": "ran",
        "export": "ran",
    }

    raw["evaluate"]["misclassified"] = 12
    write_params(repo, raw)
    outcome = repro(repo)
    assert outcome["evaluate"] == "ran"
    assert outcome["train"] == outcome["preprocess"] == outcome["fetch"] == "skipped"

    # Back to the first values: every stage's outputs come back from DVC's run cache, nothing retrains.
    model_before = (repo / "models/model.pt").read_bytes()
    write_params(repo, subset_params())
    outcome = repro(repo)
    assert outcome["train"] == "cached" and outcome["evaluate"] == "cached"
    assert "ran" not in outcome.values()
    assert (repo / "models/model.pt").read_bytes() != model_before
