"""The MLflow connection on its own: where runs go, what the source tags say, the fail-fast check of an
unreachable server, datasets, reopening a run, and the champion rule of the model registry (tiny model, temp
SQLite store). The whole pipeline's MLflow record is checked in test_mlflow_pipeline.py."""

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import REPO, TINY_MODEL_CONFIG, default_params, write_params
from mlflow import MlflowClient

from image_classifier import params as params_module
from image_classifier import tracking
from image_classifier.data import Split
from image_classifier.errors import UserError
from image_classifier.export import example_input
from image_classifier.models import build_model
from image_classifier.params import TrackingParams

TINY_CONFIG = TINY_MODEL_CONFIG


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One SQLite store for the tests that log (creating a store costs seconds); yields the repo folder."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
            patch.delenv(name, raising=False)
        patch.setenv("DVC_ROOT", str(root))
        yield root
    if mlflow.active_run():
        mlflow.end_run()


def test_store_defaults_to_sqlite_under_the_dvc_root(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.chdir(tmp_path)
    assert tracking.tracking_uri(TrackingParams()) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    # Under `dvc exp run --temp/--queue` the stage runs in a copy; DVC_ROOT names the repository that stays.
    main = tmp_path / "main"
    clean_env.setenv("DVC_ROOT", str(main))
    assert tracking.tracking_uri(TrackingParams()) == f"sqlite:///{main.resolve()}/mlruns/mlflow.db"
    assert (
        tracking.tracking_uri(TrackingParams(uri="sqlite:///team.db"))
        == f"sqlite:///{main.resolve()}/team.db"
    )
    assert tracking.tracking_uri(TrackingParams(uri="http://team:5000")) == "http://team:5000"
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.tracking_uri(TrackingParams(uri="http://team:5000")) == "http://env:5000"


def test_run_name_is_the_dvc_experiment_name(clean_env: pytest.MonkeyPatch) -> None:
    assert tracking.run_name() == ""  # MLflow then makes up a readable one
    clean_env.setenv("DVC_EXP_NAME", "plump-bots")
    assert tracking.run_name() == "plump-bots"


def git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_source_tags_name_commit_dirt_data_and_reproduce_command(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    git(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text("lr: 1\n")
    (tmp_path / "dvc.lock").write_text("stages: {}\n")
    data = tmp_path / "train.pt"
    data.write_bytes(b"some tensor bytes")
    git(tmp_path, "add", "params.yaml", "dvc.lock")
    git(tmp_path, "commit", "-q", "-m", "base")
    commit = git(tmp_path, "rev-parse", "HEAD")
    clean_env.chdir(tmp_path)

    (tmp_path / "dvc.lock").write_text("stages: {train: {}}\n")  # DVC rewrites it mid-pipeline: not dirt
    tags = tracking.source_tags({"train": data}, "cpu (2 threads)")
    assert tags["git.commit"] == commit
    assert tags["git.dirty"] == "false"
    assert tags["data.train.md5"] == hashlib.md5(b"some tensor bytes").hexdigest()
    assert tags["device"] == "cpu (2 threads)"
    assert tags["torch.version"] == torch.__version__
    assert tags["reproduce"] == f"git checkout {commit} && dvc repro"
    assert "dvc.experiment" not in tags

    (tmp_path / "params.yaml").write_text("lr: 2\n")
    assert tracking.source_tags({}, "cpu")["git.dirty"] == "true"
    assert "+lr: 2" in tracking.uncommitted_diff() and "dvc.lock" not in tracking.uncommitted_diff()

    clean_env.setenv("DVC_EXP_NAME", "plump-bots")
    clean_env.setenv("DVC_EXP_BASELINE_REV", commit)
    tags = tracking.source_tags({}, "cpu")
    assert tags["reproduce"] == f"git checkout {commit} && dvc exp apply plump-bots"
    assert tags["dvc.experiment"] == "plump-bots" and tags["dvc.baseline"] == commit


def test_unreachable_server_fails_at_once_in_one_line_naming_it(clean_env: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.perf_counter()
    with pytest.raises(UserError) as raised:
        tracking.connect(TrackingParams())
    assert time.perf_counter() - started < 5
    message = str(raised.value)
    assert uri in message and "\n" not in message and "Connection refused" in message
    # The quick-failure settings are for the check only: a long run's uploads keep MLflow's retries.
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_train_stage_exits_2_before_training_when_server_is_unreachable(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real stage script, in a folder with params.yaml and no data: it must stop at the connection check
    (no data read, no training), with exit status 2 and one line on stderr naming the URI."""
    write_params(tmp_path, default_params())
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "stages/train.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and uri in lines[0]
    assert "epoch" not in result.stdout
    assert not (tmp_path / "models").exists() and not (tmp_path / "mlruns").exists()
    # Importing torch and MLflow takes most of it; the connection check itself is instant (test above).
    assert seconds < 30, f"took {seconds:.1f}s"


def test_datasets_carry_the_dvc_md5_as_digest_and_the_real_shape(store: Path) -> None:
    tracking.connect(TrackingParams(experiment="datasets"))
    split = Split(torch.zeros(12, 1, 28, 28, dtype=torch.uint8), torch.arange(12) % 10)
    md5 = hashlib.md5(b"x").hexdigest()
    with mlflow.start_run() as run:
        tracking.log_dataset(split, "tiny", "train", Path("data/processed/train.pt"), md5)
    (logged,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.digest == md5[:16]
    assert logged.dataset.name == "tiny-train"
    assert {tag.key: tag.value for tag in logged.tags}["mlflow.data.context"] == "train"
    assert str(store / "data/processed/train.pt") in logged.dataset.source
    assert '"features_shape": [12, 1, 28, 28]' in logged.dataset.profile


def test_resume_run_reopens_the_training_run_or_starts_a_tagged_one(store: Path, tmp_path: Path) -> None:
    tracking.connect(TrackingParams(experiment="resume"))
    with mlflow.start_run() as run:
        mlflow.log_metric("train_loss", 1.0)
    run_file = tmp_path / "mlflow_run.json"
    tracking.write_run_file(run_file, run.info.run_id)
    with tracking.resume_run(run_file, "evaluate") as run_id:
        mlflow.log_metric("test_accuracy", 0.5)
    assert run_id == run.info.run_id
    assert MlflowClient().get_run(run_id).data.metrics == {"train_loss": 1.0, "test_accuracy": 0.5}

    tracking.write_run_file(run_file, "0" * 32)  # a teammate's run this store never saw
    with tracking.resume_run(run_file, "evaluate") as run_id:
        pass
    assert run_id != "0" * 32
    assert MlflowClient().get_run(run_id).data.tags["trained_in_run"] == "0" * 32


def register(name: str, accuracy: float, seed: int) -> tuple[dict, str, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(TINY_CONFIG).eval()
    with mlflow.start_run() as run:
        result = tracking.log_and_register_model(
            model, example_input(TINY_CONFIG), name, accuracy, TINY_CONFIG
        )
    return result, run.info.run_id, model


def test_champion_moves_only_to_a_version_with_better_test_accuracy(store: Path) -> None:
    tracking.connect(TrackingParams(experiment="registry"))
    client = MlflowClient()
    name = "tiny-classifier"

    first, first_run, first_model = register(name, 0.80, seed=1)
    assert first["version"] == "1" and first["promoted"]
    assert first["decision"] == "champion: test accuracy 0.8000 beats no earlier champion"

    second, second_run, _ = register(name, 0.70, seed=2)
    assert second["version"] == "2" and not second["promoted"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "2"
    version = client.get_model_version(name, "2")
    assert version.run_id == second_run
    assert version.tags["decision"] == version.description == second["decision"]
    assert second["decision"].startswith(
        "candidate only: test accuracy 0.7000 does not beat champion version 1"
    )
    assert client.get_run(second_run).data.tags["model.decision"].startswith(f"{name} version 2: candidate")

    third, _, _ = register(name, 0.90, seed=3)
    assert third["promoted"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    assert client.get_model_version(name, "3").description.startswith(
        "champion: test accuracy 0.9000 beats version 1"
    )
    assert sorted(client.get_registered_model(name).aliases) == ["candidate", "champion"]

    # Version 1 is a self-contained model: pyfunc gives what the PyTorch model gave, in float32, any batch.
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/1")
    images = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        expected = first_model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(np.asarray(loaded.predict(images)), expected, atol=1e-5)
    info = mlflow.models.get_model_info(f"models:/{name}/1")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 1, 28, 28)}
    assert info.run_id == first_run
    # Served models answer with logits: the class names travel with the model, in its MLmodel metadata.
    assert info.metadata["classes"] == TINY_CONFIG["classes"]
    assert info.metadata["image_shape"] == TINY_CONFIG["image_shape"]
    requirements = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1/requirements.txt")).read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and "mlflow==" in requirements


def test_the_input_example_must_keep_the_batch_dynamic(store: Path) -> None:
    tracking.connect(TrackingParams(experiment="registry"))
    with mlflow.start_run(), pytest.raises(ValueError, match="batch of at least 2"):
        tracking.log_and_register_model(
            build_model(TINY_CONFIG), example_input(TINY_CONFIG, batch_size=1), "tiny-classifier", 0.5
        )


@pytest.mark.parametrize(
    ("data", "model_name", "expected"),
    [
        ({"dataset": "fashion-mnist"}, "", "fashion-mnist-classifier"),
        ({"dataset": "folder", "path": "data/images"}, "", "images-classifier"),
        ({"dataset": "folder", "path": "/srv/Pets Photos/labels.csv"}, "", "pets-photos-classifier"),
        ({"dataset": "folder", "path": "data/images"}, "shoes", "shoes"),
    ],
)
def test_the_registered_name_follows_the_data_set_or_the_folder_or_the_users_name(
    data: dict, model_name: str, expected: str
) -> None:
    raw = default_params()
    raw["data"].update(data)
    raw["tracking"]["model_name"] = model_name
    assert tracking.registered_name(params_module.from_dict(raw)) == expected


def test_make_serve_serves_the_model_the_export_stage_registers(tmp_path: Path) -> None:
    """The Makefile's MODEL comes from params.yaml through the function export names the model with."""
    raw = default_params()
    raw["data"].update(dataset="folder", path="data/holiday-photos")
    write_params(tmp_path, raw)
    venv = Path(sys.executable).parent.parent
    dry_run = subprocess.run(
        ["make", "-n", "-f", str(REPO / "Makefile"), "serve", f"VENV={venv}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '-m "models:/holiday-photos-classifier@champion"' in dry_run
