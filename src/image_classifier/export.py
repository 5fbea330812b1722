"""Export formats for a trained model, and the check that ONNX computes what PyTorch computes."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from image_classifier.errors import UserError, load_failure
from image_classifier.files import atomic_path, save_tensors
from image_classifier.models import ImageClassifier, build_model, predict_logits, to_float


def save_model(path: Path, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """A model file: the config that rebuilds the network and its weights. Plain data: loads with
    `torch.load(weights_only=True)`, so opening a teammate's file runs no code."""
    save_tensors({"config": config, "state_dict": state_dict}, path)


def load_model(path: Path) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild a model saved by `save_model`, on the CPU, in eval mode; return it with its config."""
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
        model = build_model(saved["config"])
        model.load_state_dict(saved["state_dict"])
    except FileNotFoundError:
        raise UserError(f"model file {path} does not exist; run the pipeline first (dvc repro)") from None
    except Exception as error:  # any corruption: unpickling, missing keys, wrong shapes
        raise UserError(f"cannot load model file {path}: {load_failure(error)}") from None
    return model.eval(), saved["config"]


def example_input(config: dict[str, Any], batch_size: int = 2) -> torch.Tensor:
    """A float32 batch of the model's input shape. Batch size above 1, so exporters keep the batch dynamic."""
    return torch.rand(batch_size, *config["image_shape"], generator=torch.Generator().manual_seed(0))


def onnx_metadata(config: dict[str, Any]) -> dict[str, str]:
    """What a program running the .onnx alone needs beyond its graph: the class of each logit (the input shape is
    in the graph). `predict --model model.onnx` reads it; ONNX Runtime shows it as custom_metadata_map."""
    metadata = {"image_classifier.classes": json.dumps(config["classes"])}
    if "dataset" in config:
        metadata["image_classifier.dataset"] = config["dataset"]
    return metadata


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    metadata: dict[str, str] | None = None,
) -> None:
    """ONNX with a dynamic batch dimension, through the torch.export-based exporter; `metadata` goes into the
    model's metadata_props."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with atomic_path(path) as temp:
        program = torch.onnx.export(
            model.eval(),
            (example,),
            dynamo=True,
            dynamic_shapes={"images": {0: batch}},
            input_names=["images"],
            output_names=["logits"],
            opset_version=opset,
            verbose=False,
        )
        program.model.metadata_props.update(metadata or {})
        program.save(str(temp))


def export_program(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """A torch.export program (.pt2): runs without the model's Python code, e.g. from C++ or AOTInductor."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes={"images": {0: batch}})
    with atomic_path(path) as temp, temp.open("wb") as file:  # a file object: see files.save_tensors
        torch.export.save(program, file)


def onnx_parity(
    onnx_path: Path,
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Run ONNX Runtime and PyTorch over the same uint8 images; largest logit gap and prediction agreement, and
    with `labels` the calibration error of the ONNX model's own probabilities (what a deployment serves)."""
    import onnxruntime  # only export needs it: `predict` starts faster without

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    torch_logits = predict_logits(model, images, batch_size).numpy()
    onnx_logits = np.concatenate(
        [
            session.run(["logits"], {"images": to_float(images[start : start + batch_size]).numpy()})[0]
            for start in range(0, len(images), batch_size)
        ]
    )
    parity = {
        "onnx_max_abs_logit_diff": float(np.abs(onnx_logits - torch_logits).max()),
        "onnx_prediction_agreement": float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()),
        "onnx_checked_images": len(images),
    }
    if labels is not None:
        from image_classifier.calibration import expected_calibration_error

        probabilities = torch.from_numpy(onnx_logits).softmax(dim=1)
        parity["onnx_test_ece"] = expected_calibration_error(probabilities, labels)
    return parity
