"""DistributedDataParallel on the CPU: `train.processes: 2` relaunches the stage under torchrun with gloo."""

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import FASHION_DIR, copy_repo, default_params, run, write_params

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make setup)"),
]


def subset_params(processes: int) -> dict:
    raw = default_params()
    raw["preprocess"].update(val_size=2000, train_subset=6000)
    raw["train"].update(epochs=3, width=8, batch_size=128, lr=0.1, processes=processes, device="cpu")
    return raw


def mlflow_runs(repo: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(repo / "mlruns/mlflow.db") as db:
        return db.execute("select run_uuid, status from runs").fetchall()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("ddp"))
    write_params(repo, subset_params(1))
    run(["dvc", "repro", "preprocess"], cwd=repo)
    return repo


def train_once(repo: Path, processes: int) -> tuple[str, dict]:
    write_params(repo, subset_params(processes))
    output = run(["python", "stages/train.py"], cwd=repo).stdout
    return output, json.loads((repo / "reports/train/metrics.json").read_text())


def test_two_processes_match_one_and_only_rank_zero_reports(repo: Path) -> None:
    _, single = train_once(repo, 1)
    assert len(mlflow_runs(repo)) == 1

    output, distributed = train_once(repo, 2)
    assert "starting 2 training processes" in output
    assert "2 processes" in output
    # Rank 0 alone prints epochs, writes outputs and opens an MLflow run.
    assert output.count("epoch 1/3:") == 1
    runs = mlflow_runs(repo)
    assert len(runs) == 2 and all(status == "FINISHED" for _, status in runs)
    assert json.loads((repo / "reports/train/mlflow_run.json").read_text())["run_id"] in {
        run for run, _ in runs
    }
    assert not list((repo / "data/resume").glob("*.pt"))
    assert distributed["best_val_accuracy"] == pytest.approx(single["best_val_accuracy"], abs=0.01)


def test_a_timm_model_unfreezes_under_two_processes(repo: Path) -> None:
    # DDP only synchronises the parameters that needed gradients when it was built, so train.py wraps the model
    # again when the backbone is unfrozen; this checks that the rewrapped step trains on under torchrun.
    raw = subset_params(2)
    raw["train"].update(model="timm:test_resnet", epochs=2, freeze_epochs=1, precision="fp32")
    write_params(repo, raw)
    output = run(["python", "stages/train.py"], cwd=repo).stdout
    assert output.count("epoch 2: the backbone is unfrozen") == 1  # rank 0 alone says it
    assert "epoch 2/2:" in output
    metrics = json.loads((repo / "reports/train/metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and metrics["best_val_accuracy"] > 0.5
