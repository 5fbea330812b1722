"""Any model the project makes, ready to classify: a `.pt` model file (PyTorch), the exported `.onnx` (ONNX
Runtime), or an MLflow model URI (`models:/<name>@<alias>`, `models:/<name>/<version>`, `runs:/<id>/<path>`).

Each comes with its class names and input shape, so `predict` needs nothing else: the `.pt` file holds its config;
the `.onnx` holds the classes in its metadata (exports before that have `config.json` beside them) and its input
shape in its graph; a registered model has them in its MLmodel metadata. All three compute the same logits
(normalisation, test-time flip and temperature are inside the model), so their softmax is the same calibrated
probability whichever is used.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from image_classifier.errors import UserError, one_line

URI_PREFIXES = ("models:/", "runs:/")
ONNX_CLASSES_KEY = "image_classifier.classes"  # export.onnx_metadata writes it


@dataclass
class Predictor:
    """A loaded model: float32 N×C×H×W images in 0..1 → float32 N×classes logits."""

    source: str  # what was loaded, for messages ("models:/x@champion = version 3")
    backend: str  # "torch" or "onnxruntime"
    classes: list[str]
    image_shape: list[int]  # C, H, W
    logits: Callable[[np.ndarray], np.ndarray]


def load_predictor(model: str) -> Predictor:
    """The model `model` names. Every failure (missing file, damaged file, a URI the store does not know) is a
    UserError naming the model."""
    if model.startswith(URI_PREFIXES):
        return _from_mlflow(model)
    if Path(model).suffix.lower() == ".onnx":
        return _from_onnx(Path(model))
    return _from_model_file(Path(model))


def _torch_logits(module: Any) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def logits(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).float().numpy()

    return logits


def _from_model_file(path: Path) -> Predictor:
    from image_classifier.export import load_model

    model, config = load_model(path)  # its own one-line errors, which the fault suite pins
    return Predictor(str(path), "torch", config["classes"], list(config["image_shape"]), _torch_logits(model))


def _from_onnx(path: Path) -> Predictor:
    import onnxruntime

    if not path.is_file():
        raise UserError(f"model file {path} does not exist; run the export stage first (dvc repro)")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises its own exception types for every kind of damage
        raise UserError(f"cannot load ONNX model {path}: {one_line(error)}") from None
    (input_,) = session.get_inputs()
    shape = input_.shape[1:]
    if not all(isinstance(size, int) for size in shape) or len(shape) != 3:
        raise UserError(f"{path}: input shape {input_.shape} is not N×C×H×W with a fixed C, H and W")
    classes = _onnx_classes(path, session.get_modelmeta().custom_metadata_map)

    def logits(images: np.ndarray) -> np.ndarray:
        return session.run(None, {input_.name: images})[0]

    return Predictor(str(path), "onnxruntime", classes, list(shape), logits)


def _onnx_classes(path: Path, metadata: dict[str, str]) -> list[str]:
    """Class names from the ONNX metadata, or for exports made before it held them, from config.json beside."""
    if ONNX_CLASSES_KEY in metadata:
        return json.loads(metadata[ONNX_CLASSES_KEY])
    beside = path.with_name("config.json")
    try:
        return json.loads(beside.read_text())["classes"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{path} does not name its classes (no {ONNX_CLASSES_KEY} metadata, no readable {beside}); "
            "export it again (dvc repro export)"
        ) from None


def _from_mlflow(uri: str) -> Predictor:
    import mlflow
    from mlflow.exceptions import MlflowException

    from image_classifier import tracking

    store = _store_uri()
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    try:
        with tracking.quick_requests():
            source = _check_uri(uri, store)
            info = mlflow.models.get_model_info(uri)
            metadata = info.metadata or {}
            if "pytorch" not in info.flavors or not {"classes", "image_shape"} <= set(metadata):
                raise UserError(
                    f"{uri} is not a model the export stage registered (it needs the pytorch flavour and "
                    "classes and image_shape in its metadata)"
                )
            module = mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError) as error:
        raise UserError(f"cannot load {uri} from {tracking.display_uri(store)}: {one_line(error)}") from None
    # No eval(): a torch.export program keeps the mode it was saved in (export saves it in eval mode).
    return Predictor(
        source, "torch", metadata["classes"], list(metadata["image_shape"]), _torch_logits(module)
    )


def _store_uri() -> str:
    """The tracking store the pipeline uses: $MLFLOW_TRACKING_URI, else tracking.uri in params.yaml, else the
    SQLite store in mlruns/. A SQLite file that is not there is refused: MLflow would create an empty one."""
    from image_classifier import params as params_module
    from image_classifier import tracking

    settings = (
        params_module.load().tracking
        if params_module.PARAMS_FILE.is_file()
        else params_module.TrackingParams()
    )
    uri = tracking.tracking_uri(settings)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}; run the pipeline first, or point "
            "MLFLOW_TRACKING_URI at the store that holds the model"
        )
    return uri


def _check_uri(uri: str, store: str) -> str:
    """`uri` as it will be reported ("models:/x@champion = version 3"), after checking that the store knows it,
    with a message that lists what it does know."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from image_classifier.tracking import display_uri
    from image_classifier.tracking.registry import registered_version

    client, shown = MlflowClient(store, store), display_uri(store)
    run = re.fullmatch(r"runs:/([0-9a-f]+)/(.+)", uri)
    if run:
        try:
            client.get_run(run[1])
        except MlflowException:
            raise UserError(f"{uri}: no run {run[1]} in the MLflow store {shown}") from None
        return uri
    registered = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", uri)
    if not registered:
        raise UserError(
            f"--model {uri}: write models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model"
        )
    name, alias, version = registered.groups()
    number = registered_version(client, shown, name, alias, version, uri)
    if alias:
        return f"{uri} = version {number}"
    return uri
