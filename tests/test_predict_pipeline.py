"""`predict` with the models a real pipeline makes (issue 26): the .pt, the exported .onnx and the registered
model (`models:/...@champion`), all run as the `predict` command in a repository where the tiny pipeline ran.

One pipeline (module fixture: preprocess, train, evaluate, export on tiny learnable data, about 40 s) serves
every test: its test split written out as PNG files must give evaluate's accuracy exactly from all three, and a
tree of a few hundred mixed images must get the same classes from all three.
"""

import json
import os
from pathlib import Path

import pytest
from conftest import copy_repo, run, tiny_params_dict, write_idx_dataset, write_params
from fault_helpers import assert_refused, run_command
from PIL import Image
from predict_helpers import UNREADABLE, read_csv, write_mixed_tree

from image_classifier.data import load_split

pytestmark = pytest.mark.slow
MODEL_NAME = "fashion-mnist-classifier"  # the registered name: <dataset>-classifier
MODELS = {
    "pt": "models/model.pt",
    "onnx": "models/export/model.onnx",
    "registry": f"models:/{MODEL_NAME}@champion",
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # the repository's own store, mlruns/
        assert name not in os.environ or pytest.fail(f"{name} is set: the test would read another store")
    repo = copy_repo(tmp_path_factory.mktemp("predict"))
    write_idx_dataset(repo / "data/raw", gz=False)  # 400 training and 100 test images, as fetch leaves them
    write_params(repo, tiny_params_dict(fetch={"local_dirs": [], "mirrors": [], "timeout_s": 5}))
    for stage in ("preprocess", "train", "evaluate", "export"):
        run(["python", f"stages/{stage}.py"], cwd=repo)
    return repo


@pytest.fixture(scope="module")
def test_pngs(repo: Path) -> Path:
    """The test split as PNG files, <class>/<index>.png: the labels travel in the folder names."""
    test = load_split(repo / "data/processed/test").in_memory()
    classes = json.loads((repo / "data/processed/meta.json").read_text())["classes"]
    root = repo / "test-pngs"
    for index in range(len(test)):
        image, label = test.images[index], test.labels[index]
        folder = root / f"{int(label):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"{index:05d}.png")
    (root / "classes.json").write_text(json.dumps(classes))
    return root


def predict(repo: Path, *args: str, status: int = 0) -> str:
    result = run(["predict", *args], cwd=repo, check=False)
    assert result.returncode == status, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stderr


@pytest.mark.parametrize("kind", MODELS)
def test_the_test_split_as_pngs_gives_evaluates_accuracy_exactly(
    repo: Path, test_pngs: Path, kind: str
) -> None:
    out = repo / f"test-{kind}.csv"
    predict(repo, str(test_pngs.relative_to(repo)), "--model", MODELS[kind], "--out", out.name)
    rows = read_csv(out)
    classes = json.loads((test_pngs / "classes.json").read_text())
    assert len(rows) == 100 and not any(row["error"] for row in rows)
    correct = sum(row["predicted"] == classes[int(Path(row["path"]).parent.name)] for row in rows)
    evaluated = json.loads((repo / "reports/evaluate/metrics.json").read_text())["accuracy"]
    assert correct / len(rows) == evaluated, (kind, correct, evaluated)
    # Image by image too: the same class as evaluate's predictions.csv, in the test split's order.
    expected = [row["predicted"] for row in read_csv(repo / "reports/evaluate/predictions.csv")]
    by_index = sorted(rows, key=lambda row: Path(row["path"]).stem)
    assert [row["predicted"] for row in by_index] == expected


def test_a_mixed_tree_gets_the_same_classes_from_pt_onnx_and_champion(repo: Path) -> None:
    files = write_mixed_tree(repo / "drop", 300)
    rows = {}
    for kind, model in MODELS.items():
        stderr = predict(repo, "drop", "--model", model, "--out", f"drop-{kind}.csv", status=1)
        assert f"{len(UNREADABLE)} of {len(files)} files could not be read" in stderr
        rows[kind] = read_csv(repo / f"drop-{kind}.csv")
        assert [row["path"] for row in rows[kind]] == [str(Path(path).relative_to(repo)) for path in files]
        failed = [row["path"] for row in rows[kind] if row["error"]]
        assert sorted(failed) == sorted(f"drop/{name}" for name in UNREADABLE)
    for kind in ("onnx", "registry"):
        assert [row["predicted"] for row in rows[kind]] == [row["predicted"] for row in rows["pt"]], kind
        gaps = [
            abs(float(a[f"top{k}_probability"]) - float(b[f"top{k}_probability"]))
            for a, b in zip(rows["pt"], rows[kind], strict=True)
            if not a["error"]
            for k in range(1, 6)
        ]
        assert max(gaps) <= 1e-4, (kind, max(gaps))


def test_a_version_number_and_a_run_uri_name_the_same_model(repo: Path, test_pngs: Path) -> None:
    run_id = json.loads((repo / "reports/train/mlflow_run.json").read_text())["run_id"]
    folder = str(test_pngs.relative_to(repo))
    for name, model in (
        ("pt", MODELS["pt"]),
        ("version", f"models:/{MODEL_NAME}/1"),
        ("run", f"runs:/{run_id}/model"),
    ):
        predict(repo, folder, "--model", model, "--out", f"by-{name}.csv")
    expected = [row["predicted"] for row in read_csv(repo / "by-pt.csv")]
    for name in ("version", "run"):
        assert [row["predicted"] for row in read_csv(repo / f"by-{name}.csv")] == expected, name


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("models:/nope@champion", rf"no registered model 'nope' in sqlite:///.*; known: {MODEL_NAME}"),
        (f"models:/{MODEL_NAME}@best", r"has no alias 'best'; its aliases: @candidate, @champion"),
        (f"models:/{MODEL_NAME}/7", r"has no version 7; its versions: 1"),
        ("runs:/0123456789abcdef/model", r"no run 0123456789abcdef in the MLflow store"),
        ("models:/", r"write models:/<name>@<alias>"),
    ],
)
def test_uris_the_store_does_not_know_fail_in_one_line(repo: Path, test_pngs: Path, model: str, message: str):
    folder = str(test_pngs.relative_to(repo))
    assert_refused(repo, ["predict", folder, "--model", model, "--out", "reports/p.csv"], (message,))
    assert not (repo / "reports/p.csv").exists()


def test_no_store_at_all_is_one_line_and_creates_none(repo: Path, test_pngs: Path, tmp_path: Path) -> None:
    result = run_command(
        ["predict", str(test_pngs), "--model", "models:/x@champion"],
        tmp_path,  # no params.yaml, no mlruns/ here
    )
    assert result.returncode == 2 and b"no MLflow store at" in result.stderr, result.stderr
    assert not (tmp_path / "mlruns").exists()
