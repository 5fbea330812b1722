"""MLflow end to end: `dvc repro` in a fresh copy of the repository on a real-data subset (two short epochs),
then what the store holds, the registered model through pyfunc and through the real `mlflow models serve`,
a queued DVC grid and a `--temp` experiment landing in the main store, and the runs in the MLflow UI in
headless Chromium.

One pipeline run (module fixture) serves every test; the experiments are added to it once (`grid` fixture).
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from conftest import FASHION_DIR, copy_repo, default_params, run, write_params
from mlflow import MlflowClient
from mlflow.entities import Run
from PIL import Image

from image_classifier.data import load_split
from image_classifier.export import PARITY_IMAGES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make setup)"),
]
EXPERIMENT = "image-classifier"
MODEL = "fashion-mnist-classifier"
CHROMIUM = Path("/usr/bin/chromium")
BIN = Path(sys.executable).parent
EPOCH_METRICS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "epoch_seconds",
    "samples_per_second",
)
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")
DVC_ENV = ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE")


def subset_params() -> dict[str, Any]:
    raw = default_params()
    raw["preprocess"].update(val_size=1000, train_subset=3000)
    raw["train"].update(epochs=2, width=8, batch_size=128, lr=0.05)
    return raw


@dataclass
class Pipeline:
    repo: Path
    uri: str
    client: MlflowClient
    experiment_id: str
    runs: list[Run]  # the store right after the first `dvc repro`
    versions: list[Any]  # registered versions then
    aliases: dict[str, str]  # registered aliases then


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    with pytest.MonkeyPatch.context() as patch:
        for name in MLFLOW_ENV + DVC_ENV:
            patch.delenv(name, raising=False)
        repo = copy_repo(tmp_path_factory.mktemp("mlflow-pipeline")).resolve()
        write_params(repo, subset_params())
        run(["dvc", "repro"], cwd=repo)
        uri = f"sqlite:///{repo}/mlruns/mlflow.db"
        mlflow.set_tracking_uri(uri)  # `models:/` URIs in this process read the same store
        mlflow.set_registry_uri(uri)
        client = MlflowClient(uri, uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None, f"no experiment {EXPERIMENT} in {uri}"
        yield Pipeline(
            repo=repo,
            uri=uri,
            client=client,
            experiment_id=experiment.experiment_id,
            runs=client.search_runs([experiment.experiment_id]),
            versions=client.search_model_versions(f"name='{MODEL}'"),
            aliases={k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()},
        )


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, folder):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def lock_md5s(repo: Path) -> dict[str, str]:
    """md5 of every file dependency in dvc.lock, by path."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {dep["path"]: dep["md5"] for stage in lock["stages"].values() for dep in stage.get("deps", [])}


def test_one_run_holds_params_epoch_history_test_metrics_and_parity(pipeline: Pipeline) -> None:
    assert len(pipeline.runs) == 1, [r.info.run_name for r in pipeline.runs]
    (found,) = pipeline.runs
    repo, client = pipeline.repo, pipeline.client
    run_id = json.loads((repo / "reports/train/mlflow_run.json").read_text())["run_id"]
    assert found.info.run_id == run_id and found.info.status == "FINISHED"
    assert found.info.run_name  # MLflow's readable name outside a DVC experiment

    params = found.data.params
    expected = {f"{section}.{key}" for section, values in subset_params().items() for key in values}
    assert expected <= set(params), expected - set(params)
    assert params["train.lr"] == "0.05" and params["preprocess.train_subset"] == "3000"
    assert params["train.epochs"] == "2" and params["train.width"] == "8"

    history = list(csv.DictReader((repo / "reports/train/history.csv").open()))
    for key in EPOCH_METRICS:
        logged = client.get_metric_history(run_id, key)
        assert [m.step for m in logged] == [1, 2], key
        assert [m.value for m in logged] == pytest.approx([float(row[key]) for row in history], rel=1e-4), key

    metrics = found.data.metrics
    test = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(test["accuracy"]) and 0.5 < test["accuracy"] <= 1
    assert metrics["test_loss"] == pytest.approx(test["loss"])
    assert metrics["test_macro_f1"] == pytest.approx(test["macro_f1"])
    for name, values in test["per_class"].items():
        safe = "".join(ch if ch.isalnum() else "_" for ch in name)
        assert metrics[f"test_recall_{safe}"] == pytest.approx(values["recall"]), name
    assert "test_recall_Ankle_boot" in metrics
    for key in ("ece", "nll", "brier", "mean_confidence"):
        assert metrics[f"test_{key}"] == pytest.approx(test[key]), key
    export = json.loads((repo / "reports/export/metrics.json").read_text())
    assert export["onnx_checked_images"] == PARITY_IMAGES  # of the 10,000, evenly spaced
    for key, value in export.items():
        assert metrics[key] == pytest.approx(value), key
    train = json.loads((repo / "reports/train/metrics.json").read_text())
    assert metrics["best_val_accuracy"] == pytest.approx(train["best_val_accuracy"])
    for key in ("temperature", "val_ece_before", "val_ece_after", "val_nll_before", "val_nll_after"):
        assert metrics[f"calibration.{key}"] == pytest.approx(train[f"calibration.{key}"]), key


def test_run_is_traceable_to_commit_data_device_and_command(pipeline: Pipeline) -> None:
    (found,) = pipeline.runs
    repo, tags, run_id = pipeline.repo, found.data.tags, found.info.run_id
    commit = run(["git", "rev-parse", "HEAD"], cwd=repo).stdout.strip()
    assert tags["git.commit"] == commit
    # copy_repo committed the default params; the subset params were written after: a dirty tree, whose
    # changes are logged so the `reproduce` command can apply them.
    assert tags["git.dirty"] == "true"
    diff = pipeline.client.download_artifacts(run_id, "source/uncommitted.diff", str(repo / "diff-check"))
    assert "+  train_subset: 3000" in Path(diff).read_text()
    assert tags["reproduce"].startswith(f"git checkout {commit} && mlflow artifacts download -r {run_id}")
    assert tags["reproduce"].endswith("git apply source/uncommitted.diff && dvc repro")
    assert tags["torch.version"] == torch.__version__
    assert tags["device"].split()[0] in {"cpu", "cuda", "mps", "xpu"}

    lock = lock_md5s(repo)
    for name in ("train", "val", "test"):
        assert tags[f"data.{name}.md5"] == lock[f"data/processed/{name}"], name
    assert tags["data.meta.md5"] == lock["data/processed/meta.json"]

    inputs = {
        {tag.key: tag.value for tag in item.tags}["mlflow.data.context"]: item.dataset
        for item in found.inputs.dataset_inputs
    }
    assert set(inputs) == {"train", "val", "test"}
    for name, size in (("train", 3000), ("val", 1000), ("test", 10000)):
        dataset = inputs[name]
        assert dataset.digest == tags[f"data.{name}.md5"][:16]
        assert dataset.name == f"fashion-mnist-{name}"
        assert json.loads(dataset.profile)["features_shape"] == [size, 1, 28, 28]
        assert json.loads(dataset.source)["uri"] == str(repo / f"data/processed/{name}")


def test_run_has_every_report_file_and_the_onnx_model(pipeline: Pipeline) -> None:
    (found,) = pipeline.runs
    logged = artifact_paths(pipeline.client, found.info.run_id)
    expected = {
        "train/curves.png",
        "train/history.csv",
        "train/metrics.json",
        "train/params.yaml",
        "evaluate/confusion.png",
        "evaluate/misclassified.png",
        "evaluate/reliability.png",
        "evaluate/metrics.json",
        "export/model.onnx",
        "export/config.json",
        "export/metrics.json",
    }
    assert expected <= logged, expected - logged
    local = Path(
        pipeline.client.download_artifacts(found.info.run_id, "export/model.onnx", str(pipeline.repo / "dl"))
    )
    assert local.read_bytes() == (pipeline.repo / "models/export/model.onnx").read_bytes()


def test_model_is_registered_with_aliases_and_the_decision(pipeline: Pipeline) -> None:
    (found,) = pipeline.runs
    (version,) = pipeline.versions
    assert str(version.version) == "1" and version.run_id == found.info.run_id
    assert pipeline.aliases == {"candidate": "1", "champion": "1"}
    accuracy = found.data.metrics["test_accuracy"]
    decision = f"champion: test accuracy {accuracy:.4f} beats no earlier champion"
    assert version.tags["decision"] == decision and version.description == decision
    assert version.tags["test_accuracy"] == f"{accuracy:.6f}"
    assert found.data.tags["model.decision"] == f"{MODEL} version 1: {decision}"

    info = mlflow.models.get_model_info(f"models:/{MODEL}/1")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 1, 28, 28)}
    assert info.saved_input_example_info is not None
    requirements = Path(
        mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1/requirements.txt")
    ).read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements


def load_test_images(repo: Path) -> tuple[np.ndarray, np.ndarray]:
    test = load_split(repo / "data/processed/test")
    return (test.images[:].float() / 255).numpy(), test.labels.numpy()


def test_pyfunc_champion_predicts_the_onnx_classes_on_the_whole_test_set(pipeline: Pipeline) -> None:
    images, labels = load_test_images(pipeline.repo)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.float32
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    pyfunc_classes = np.concatenate(
        [np.asarray(model.predict(images[i : i + 1000])).argmax(1) for i in range(0, len(images), 1000)]
    )
    session = onnxruntime.InferenceSession(
        str(pipeline.repo / "models/export/model.onnx"), providers=["CPUExecutionProvider"]
    )
    onnx_classes = np.concatenate(
        [
            session.run(["logits"], {"images": images[i : i + 1000]})[0].argmax(1)
            for i in range(0, len(images), 1000)
        ]
    )
    assert len(pyfunc_classes) == len(onnx_classes) == 10000
    assert np.array_equal(pyfunc_classes, onnx_classes), f"{(pyfunc_classes != onnx_classes).sum()} differ"
    (found,) = pipeline.runs
    assert (pyfunc_classes == labels).mean() == pytest.approx(found.data.metrics["test_accuracy"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(
    command: list[str], url: str, log: Path, env: dict[str, str], timeout: float = 120
) -> Iterator[None]:
    """Start `command` in its own process group, wait until `url` answers 200, and stop the whole group
    (server and workers) afterwards, whatever happens."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **env}
    with log.open("w") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"{command[:3]} exited {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue


def test_mlflow_models_serve_answers_like_the_local_champion(pipeline: Pipeline, tmp_path: Path) -> None:
    images, _ = load_test_images(pipeline.repo)
    batch = images[:8]
    expected = np.asarray(mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(batch))
    port = free_port()
    command = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{MODEL}@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    base = f"http://127.0.0.1:{port}"
    with server(command, f"{base}/ping", tmp_path / "serve.log", {"MLFLOW_TRACKING_URI": pipeline.uri}):
        request = urllib.request.Request(
            f"{base}/invocations",
            data=json.dumps({"inputs": batch.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    predictions = np.asarray(answer["predictions"])
    assert predictions.shape == (8, 10)
    assert np.array_equal(predictions.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(predictions, expected, atol=1e-4)


@dataclass
class Experiment:
    name: str
    lr: float
    accuracy: float


def dvc_experiments(repo: Path) -> dict[str, Experiment]:
    """Every experiment `dvc exp show` lists under its baseline, with its learning rate and test accuracy."""
    found = {}
    for baseline in json.loads(run(["dvc", "exp", "show", "--json"], cwd=repo).stdout):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                data = rev["data"]
                lr = data["params"]["params.yaml"]["data"]["train"]["lr"]
                accuracy = data["metrics"]["reports/evaluate/metrics.json"]["data"]["accuracy"]
                found[rev["name"]] = Experiment(rev["name"], lr, accuracy)
    return found


@pytest.fixture(scope="module")
def grid(pipeline: Pipeline) -> dict[str, Experiment]:
    """A two-point queued grid and one `--temp` experiment, run by DVC in its temporary copies under
    .dvc/tmp/exps. The baseline must be a commit: commit the subset params and dvc.lock first."""
    repo = pipeline.repo
    run(["git", "config", "user.name", "test"], cwd=repo)
    run(["git", "config", "user.email", "test@example.com"], cwd=repo)
    run(["git", "add", "-A"], cwd=repo)  # mlruns/ and data/ are ignored
    run(["git", "commit", "-q", "-m", "subset baseline"], cwd=repo)
    run(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.003,0.01"], cwd=repo)
    run(["dvc", "exp", "run", "--run-all"], cwd=repo, timeout=1200)
    run(["dvc", "exp", "run", "--temp", "-S", "train.lr=0.02"], cwd=repo, timeout=600)
    return dvc_experiments(repo)


def test_queued_and_temp_experiments_land_in_the_main_store(
    pipeline: Pipeline, grid: dict[str, Experiment]
) -> None:
    assert sorted(e.lr for e in grid.values()) == [0.003, 0.01, 0.02], grid
    repo, client = pipeline.repo, pipeline.client
    runs = client.search_runs([pipeline.experiment_id], "tags.`dvc.experiment` != ''")
    by_name = {found.info.run_name: found for found in runs}
    assert len(runs) == 3 and set(by_name) == set(grid), (sorted(by_name), sorted(grid))
    for name, experiment in grid.items():
        found = by_name[name]
        assert found.info.status == "FINISHED", name
        assert found.data.tags["dvc.experiment"] == name
        assert found.data.tags["reproduce"].endswith(f"dvc exp apply {name}")
        assert float(found.data.params["train.lr"]) == experiment.lr
        # The MLflow run is the DVC experiment: same test accuracy in both.
        assert found.data.metrics["test_accuracy"] == pytest.approx(experiment.accuracy), name
        assert [m.step for m in client.get_metric_history(found.info.run_id, "val_accuracy")] == [1, 2]
        assert "export/model.onnx" in artifact_paths(client, found.info.run_id)
        for item in found.inputs.dataset_inputs:
            assert ".dvc/tmp" not in item.dataset.source
    assert len({by_name[name].data.metrics["test_accuracy"] for name in grid}) == 3, (
        "distinct runs, distinct results"
    )
    assert len({by_name[name].info.run_id for name in grid} | {pipeline.runs[0].info.run_id}) == 4
    assert not list((repo / ".dvc/tmp").rglob("mlflow.db")), (
        "a store was written inside DVC's temporary copies"
    )

    # Every experiment registered a version; champion follows the best test accuracy in registration order.
    versions = sorted(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert len(versions) == 4
    champion, best = None, -1.0
    for version in versions:
        accuracy = float(version.tags["test_accuracy"])
        if accuracy > best:
            champion, best = str(version.version), accuracy
        assert version.tags["decision"].startswith(
            "champion" if champion == str(version.version) else "candidate"
        )
    aliases = {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}
    assert aliases == {"candidate": str(versions[-1].version), "champion": champion}


def test_mlflow_ui_shows_the_runs_side_by_side(
    pipeline: Pipeline, grid: dict[str, Experiment], tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            "needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; make setup-test)"
        )
    from playwright.sync_api import sync_playwright

    runs = pipeline.client.search_runs([pipeline.experiment_id])
    assert len(runs) >= 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        pipeline.uri,
        "--artifacts-destination",
        str(pipeline.repo / "mlruns/artifacts"),
    ]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-gpu",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
    ]
    with server(command, f"{base}/health", tmp_path / "server.log", env), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.set_default_timeout(60_000)
            page.goto(f"{base}/#/experiments/{pipeline.experiment_id}/runs?workflowType=machine_learning")
            page.wait_for_selector(".ag-row")  # never "networkidle": the UI keeps polling
            close_assistant(page)
            rows = page.locator(".ag-center-cols-container .ag-row, .ag-pinned-left-cols-container .ag-row")
            for found in runs:
                assert page.locator(".ag-row", has_text=found.info.run_name).count() >= 1, found.info.run_name
            assert rows.count() >= len(runs)
            show_columns(page, ["Dataset", "Source", "test_accuracy", "train.lr"])
            header = page.locator(".ag-header")
            assert header.get_by_text("test_accuracy", exact=True).is_visible()
            assert header.get_by_text("train.lr", exact=True).is_visible()
            for found in runs:
                # The grid draws a row in two parts (pinned name, scrolling values) that share a row-index.
                index = page.locator(".ag-row", has_text=found.info.run_name).first.get_attribute("row-index")
                row = " ".join(page.locator(f'.ag-row[row-index="{index}"]').all_inner_texts())
                accuracy = found.data.metrics["test_accuracy"]
                assert str(round(accuracy, 4)) in row, (found.info.run_name, accuracy, row)
            page.screenshot(path=str(shots / "mlflow-runs.png"))

            ids = json.dumps([found.info.run_id for found in runs])
            page.set_viewport_size({"width": 1280, "height": 1150})
            page.goto(
                f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([pipeline.experiment_id])}"
                "&workflowType=machine_learning"
            )
            page.wait_for_selector("text=Run details")
            close_assistant(page)
            for found in runs:
                name = found.info.run_name
                assert page.get_by_text(name, exact=True).first.is_visible(), name
            plot_metric(page, "test_accuracy")
            page.get_by_role("switch").first.click()  # parameters: show only those that differ
            lr_row = page.locator("tr", has=page.get_by_text("train.lr", exact=True)).last
            for found in runs:
                assert found.data.params["train.lr"] in lr_row.inner_text()
            page.get_by_text("Comparing").first.scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "mlflow-compare.png"))
        finally:
            browser.close()
    for name in ("mlflow-runs.png", "mlflow-compare.png"):
        assert (shots / name).read_bytes()[:4] == b"\x89PNG" and (shots / name).stat().st_size > 10_000
    # MLFLOW_SCREENSHOT_DIR=docs refreshes the README's picture, in 128 colours (a third of the bytes).
    keep = os.environ.get("MLFLOW_SCREENSHOT_DIR")
    if keep:
        picture = Image.open(shots / "mlflow-compare.png").convert("RGB").quantize(colors=128)
        picture.save(Path(keep) / "mlflow-compare.png", optimize=True)


def close_assistant(page: Any) -> None:
    """The 3.17 UI opens an assistant panel over the right of the page on a local server."""
    close = page.locator('[data-assistant-ui="true"] button[aria-label="Close"]')
    if close.count():
        close.first.click()


def show_columns(page: Any, names: list[str]) -> None:
    """Toggle columns in the runs table's "Columns" tree (Dataset and Source are on, metrics and params off)."""
    page.get_by_role("button", name="Columns").click()
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        node = page.locator(".du-bois-light-tree-treenode").filter(
            has=page.locator(".du-bois-light-tree-title", has_text=name)
        )
        node.first.locator(".du-bois-light-tree-checkbox").click()
    page.keyboard.press("Escape")


def plot_metric(page: Any, metric: str) -> None:
    """Show `metric` instead of the default one in the compare view's parallel-coordinates plot."""
    chooser = page.locator("text=Metrics:").locator("xpath=following-sibling::*[1]")
    chooser.locator(".du-bois-light-select-selection-item-remove").first.click()
    chooser.click()
    page.keyboard.type(metric)
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    page.locator(".parcoords, svg").get_by_text(metric, exact=True).first.wait_for()
