"""The model registry: a model's registered name, logging and registering a version, the candidate and champion
aliases, and downloading a registered version's weights for a warm start."""

import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from image_classifier.errors import UserError
from image_classifier.params import Params, TrackingParams
from image_classifier.tracking.store import quick_requests, request_failure, tracking_uri

CANDIDATE, CHAMPION = "candidate", "champion"
# The plain state dict inside every registered model, so a warm start downloads just the weights and loads them
# with weights_only=True (the pt2 program beside it is not a state dict).
WEIGHTS_ARTIFACT = "extra_files/weights.pt"


def model_name(params: TrackingParams, dataset: str, data_path: str = "") -> str:
    """The registered model's name: tracking.model_name, else `<dataset>-classifier`. A folder of your own images
    (a CSV: the folder it sits in) names it, `<folder>-classifier`: two folders' models in one store must not
    become versions of one model, competing for its champion alias."""
    if params.model_name:
        return params.model_name
    if dataset == "folder" and data_path:
        path = Path(data_path)
        folder = path.parent if path.suffix.lower() == ".csv" else path
        # Lower case, and nothing that a models:/<name>@alias URI or a shell would read as syntax.
        dataset = re.sub(r"[^a-z0-9._-]+", "-", folder.name.lower()).strip("-._") or dataset
    return f"{dataset}-classifier"


def registered_name(params: Params) -> str:
    """What the export stage registers under `params`, and what `make serve` serves."""
    return model_name(params.tracking, params.data.dataset, params.data.path)


def _pip_requirements() -> list[str]:
    """What the logged model needs to load: the PyTorch and NumPy this run used (MLflow adds itself)."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def _model_metadata(config: dict[str, Any]) -> dict[str, Any]:
    metadata = {key: config[key] for key in ("dataset", "classes", "image_shape") if key in config}
    if "classes" in metadata:
        metadata["outputs"] = (
            "logits, one per class in the order of `classes`, temperature-scaled: their softmax gives calibrated "
            "probabilities; inputs are float32 in 0..1"
        )
    return metadata


def log_and_register_model(
    model: torch.nn.Module,
    example: torch.Tensor,
    registered_name: str,
    test_accuracy: float,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Log the model into the active run (MLflow 3 API), register a new version, alias it `candidate`, and
    move `champion` to it only if its test accuracy beats the current champion's; the decision is recorded on
    the version (tag `decision` and its description). Returns the name, version, decision and whether it won.

    The model's MLmodel metadata gets the class names and input shape from `config`: the served model answers
    with one logit per class, and whoever loads it (`mlflow.models.get_model_info(uri).metadata`) needs to know
    which class each one is."""
    version = _log_model(model, example, registered_name, config or {})
    client = MlflowClient()
    client.set_model_version_tag(registered_name, version, "test_accuracy", f"{test_accuracy:.6f}")
    promoted, decision = _set_aliases(client, registered_name, version, test_accuracy)
    client.set_model_version_tag(registered_name, version, "decision", decision)
    client.update_model_version(registered_name, version, description=decision)
    mlflow.set_tag("model.decision", f"{registered_name} version {version}: {decision}")
    return {"name": registered_name, "version": version, "promoted": promoted, "decision": decision}


def _log_model(
    model: torch.nn.Module, example: torch.Tensor, registered_name: str, config: dict[str, Any]
) -> str:
    """Log `model` with its signature, input example, metadata and plain weights file, registered as a new
    version of `registered_name`; returns the version number."""
    model = model.cpu().eval()  # pt2 loading keeps the mode it was saved in
    example = example.detach().cpu().float()
    if example.shape[0] < 2:
        raise ValueError("the input example needs a batch of at least 2, or the saved model's batch is fixed")
    with torch.no_grad():
        output = model(example).numpy()
    example_np = example.numpy()
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / Path(WEIGHTS_ARTIFACT).name
        torch.save(model.state_dict(), weights)
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=mlflow.models.infer_signature(example_np, output),
            input_example=example_np,
            pip_requirements=_pip_requirements(),
            registered_model_name=registered_name,
            metadata=_model_metadata(config),
            extra_files=[str(weights)],  # MLflow puts them under extra_files/: WEIGHTS_ARTIFACT
            # MLflow would load the saved program back and run the example, only to warn if that failed: 2.5 s
            # of EfficientNet-Lite0's export. The tests load and run the registered models instead.
            validate_serving_input=False,
        )
    return str(info.registered_model_version)


def _set_aliases(client: MlflowClient, name: str, version: str, test_accuracy: float) -> tuple[bool, str]:
    """Alias `version` `candidate`, and `champion` only if its test accuracy beats the current champion's;
    returns whether it became champion and the decision in words."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
        champion_accuracy = float(champion.tags.get("test_accuracy", "-1"))
    except MlflowException:
        champion, champion_accuracy = None, -1.0
    client.set_registered_model_alias(name, CANDIDATE, version)
    if test_accuracy > champion_accuracy:
        client.set_registered_model_alias(name, CHAMPION, version)
        return True, f"champion: test accuracy {test_accuracy:.4f} beats " + (
            f"version {champion.version} ({champion_accuracy:.4f})" if champion else "no earlier champion"
        )
    return False, (
        f"candidate only: test accuracy {test_accuracy:.4f} does not beat champion version "
        f"{champion.version} ({champion_accuracy:.4f})"
    )


def download_registered_weights(uri: str, params: TrackingParams, folder: Path) -> tuple[Path, str]:
    """The weights file of the registered model version `models:/<name>@<alias>` or `models:/<name>/<version>`
    names, downloaded into `folder`; returns its path and "<name> version <n>" (an alias moves: the number says
    which one was used). Every failure is one line naming the cause."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", uri)
    if not match:
        raise UserError(
            f"train.init_from = {uri!r}: write models:/<name>@<alias> or models:/<name>/<version>"
        )
    name, alias, version = match.groups()
    store = tracking_uri(params)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    client = MlflowClient()
    try:
        with quick_requests():
            version = registered_version(client, store, name, alias, version, "train.init_from")
    except (MlflowException, OSError) as error:
        raise UserError(
            f"train.init_from: cannot use the MLflow store {store} ({request_failure(error)})"
        ) from None
    try:
        path = mlflow.artifacts.download_artifacts(
            f"models:/{name}/{version}/{WEIGHTS_ARTIFACT}", dst_path=str(folder)
        )
    except (MlflowException, OSError):
        raise UserError(
            f"train.init_from: {name} version {version} has no {WEIGHTS_ARTIFACT} (registered before warm starts "
            "existed); run the export stage again to register a version that has it"
        ) from None
    return Path(path), f"{name} version {version}"


def registered_version(
    client: MlflowClient, store: str, name: str, alias: str | None, version: str | None, asked_by: str
) -> str:
    """The version number `alias` points at, or `version` once checked to exist; a model, alias or version the
    store lacks is a UserError, beginning with `asked_by` (what named it), that lists what the store has."""
    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = [model.name for model in client.search_registered_models(max_results=20)]
        raise UserError(
            f"{asked_by}: no registered model '{name}' in {store}; known: {', '.join(known) or 'none'}"
        ) from None
    if alias:
        if alias not in registered.aliases:
            aliases = ", ".join(f"@{a}" for a in sorted(registered.aliases)) or "none"
            raise UserError(f"{asked_by}: model '{name}' has no alias '{alias}'; its aliases: {aliases}")
        return str(registered.aliases[alias])
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if int(version) not in versions:
        raise UserError(
            f"{asked_by}: model '{name}' has no version {version}; "
            f"its versions: {', '.join(map(str, versions)) or 'none'}"
        )
    return version
