"""The MLflow connection: where runs go, what a run records, and how models are registered.

Train opens one run; evaluate and export reopen it by the id train wrote to a small DVC-tracked file, so one
row in the MLflow UI holds train, validation and test metrics and every exported file.
"""

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from image_classifier.data import Split
from image_classifier.errors import UserError
from image_classifier.files import atomic_path
from image_classifier.params import TrackingParams

STORE_DIR = "mlruns"
CANDIDATE, CHAMPION = "candidate", "champion"


def repo_root() -> Path:
    """The user's repository. `dvc exp run --temp/--queue` runs stages in a copy under .dvc/tmp/exps that DVC
    deletes afterwards; it sets DVC_ROOT to the original repository, so runs land in the store that stays."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: TrackingParams) -> str:
    """$MLFLOW_TRACKING_URI, else `tracking.uri`, else the SQLite store in mlruns/ at the repository root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.uri
    if uri:
        return uri
    return f"sqlite:///{repo_root() / STORE_DIR / 'mlflow.db'}"


def model_name(params: TrackingParams, dataset: str) -> str:
    return params.model_name or f"{dataset}-classifier"


def connect(params: TrackingParams) -> str:
    """Point MLflow at the configured store and fail fast, in one line naming the URI, if it cannot be used."""
    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        (repo_root() / STORE_DIR).mkdir(parents=True, exist_ok=True)
    else:
        # Ask once, quickly, instead of MLflow's default of minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name(params.experiment)
        if experiment is None:
            artifacts = (
                (repo_root() / STORE_DIR / "artifacts").as_uri() if uri.startswith("sqlite:") else None
            )
            mlflow.create_experiment(params.experiment, artifact_location=artifacts)
        mlflow.set_experiment(params.experiment)
    except (MlflowException, OSError) as error:
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"MLflow tracking store {uri} cannot be used: {reason}") from None
    return uri


def run_name() -> str:
    """The DVC experiment's name under `dvc exp run`, else one MLflow makes up (readable, e.g. 'bold-owl-42')."""
    return os.environ.get("DVC_EXP_NAME") or ""


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def file_md5(path: Path) -> str:
    """The md5 DVC records for a file in dvc.lock, so a tag points at the exact cached object."""
    digest = hashlib.md5()
    with Path(path).open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def source_tags(data_files: dict[str, Path], device: str) -> dict[str, str]:
    """Tags that trace a run to its code, data and machine, and say how to get its outputs back."""
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        reproduce = f"git checkout {commit[:12]} && dvc exp apply {experiment} && dvc checkout"
    else:
        reproduce = f"git checkout {commit[:12]} && dvc checkout" if commit else "dvc repro"
    tags = {
        "git.commit": commit or "unknown",
        "git.dirty": str(dirty).lower(),
        "device": device,
        "torch.version": torch.__version__,
        "reproduce": reproduce,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    tags.update({f"data.{name}.md5": file_md5(path) for name, path in data_files.items()})
    if experiment:
        tags["dvc.experiment"] = experiment
    return tags


@contextmanager
def start_run(flat_params: dict[str, Any], tags: dict[str, str]) -> Iterator[str]:
    """A run with every param and the source tags, ended as FAILED if the block raises; yields its id."""
    with mlflow.start_run(run_name=run_name() or None, tags=tags) as run:
        mlflow.log_params(flat_params)
        yield run.info.run_id


def log_dataset(split: Split, dataset: str, context: str, path: Path, md5: str) -> None:
    """Record a split as an MLflow dataset whose digest is the md5 DVC records for its file."""
    logged = mlflow.data.from_numpy(
        features=split.images[:1].numpy(),  # the schema needs one example, not the whole set
        targets=split.labels[:1].numpy(),
        source=str(Path(path).resolve()),
        name=f"{dataset}-{context}",
        digest=md5[:16],
    )
    mlflow.log_input(logged, context=context)


def log_results(metrics: dict[str, float], artifacts: list[Path], folder: str | None = None) -> None:
    """Final metrics and files of a stage, into the active run."""
    mlflow.log_metrics(metrics)
    for path in artifacts:
        mlflow.log_artifact(str(path), artifact_path=folder)


def log_epoch(stats: dict[str, float]) -> None:
    mlflow.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=int(stats["epoch"]))


def write_run_file(path: Path, run_id: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(json.dumps({"run_id": run_id}, indent=2) + "\n")


@contextmanager
def resume_run(run_file: Path) -> Iterator[str]:
    """Reopen the training run named in `run_file`. If this store lacks it (outputs pulled from a teammate
    without their MLflow server), open a new run tagged with the missing id rather than lose the results."""
    run_id = json.loads(Path(run_file).read_text())["run_id"]
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        print(f"warning: MLflow run {run_id} is not in this store; logging to a new run", file=sys.stderr)
        with mlflow.start_run(tags={"trained_in_run": run_id}) as run:
            yield run.info.run_id
        return
    with mlflow.start_run(run_id=run_id) as run:
        yield run.info.run_id


def log_and_register_model(
    model: torch.nn.Module,
    example: torch.Tensor,
    registered_name: str,
    test_accuracy: float,
) -> dict[str, Any]:
    """Log the model (MLflow 3 API), register a new version, alias it `candidate`, and move `champion` to it
    only if it beats the current champion's test accuracy. Returns the version and the decision."""
    model = model.cpu().eval()  # pt2 loading keeps the mode it was saved in
    example_np = example.cpu().float().numpy()
    with torch.no_grad():
        output = model(example.cpu().float()).numpy()
    signature = mlflow.models.infer_signature(example_np, output)
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=signature,
        input_example=example_np,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        registered_model_name=registered_name,
    )
    client = MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(registered_name, CANDIDATE, version)
    client.set_model_version_tag(registered_name, version, "test_accuracy", f"{test_accuracy:.6f}")
    try:
        champion = client.get_model_version_by_alias(registered_name, CHAMPION)
        champion_accuracy = float(champion.tags.get("test_accuracy", "-1"))
    except MlflowException:
        champion, champion_accuracy = None, -1.0
    promoted = test_accuracy > champion_accuracy
    if promoted:
        client.set_registered_model_alias(registered_name, CHAMPION, version)
        decision = f"champion: test accuracy {test_accuracy:.4f} beats " + (
            f"version {champion.version} ({champion_accuracy:.4f})" if champion else "no earlier champion"
        )
    else:
        decision = (
            f"candidate only: test accuracy {test_accuracy:.4f} does not beat champion version "
            f"{champion.version} ({champion_accuracy:.4f})"
        )
    client.set_model_version_tag(registered_name, version, "decision", decision)
    client.update_model_version(registered_name, version, description=decision)
    return {"name": registered_name, "version": version, "promoted": promoted, "decision": decision}
