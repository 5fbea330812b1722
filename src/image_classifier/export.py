"""Export formats for a trained model, and the check that ONNX computes what PyTorch computes.

What parity means: ONNX Runtime and PyTorch run the same float arithmetic in another order, so their logits
differ by float noise that grows with the network's depth and the size of its activations (measured: docs/benchmarks.md
"Export": under 1e-6 of the logits' scale for our CNN, ResNet, ViT and EfficientNet-Lite0). An absolute
tolerance made for a small CNN fails a correct export of a larger model; so the check judges what a deployment
sees: the logit gap relative to the logits' scale and the gap in probabilities; with those bounded, a predicted
class can change only on a near-tie (reported: how far apart PyTorch's top two logits were where one changed).
"""

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from image_classifier import paths
from image_classifier.device import inference_batch_size, inference_layout
from image_classifier.errors import UserError, load_failure
from image_classifier.files import atomic_path, file_digest, save_tensors
from image_classifier.models import ImageClassifier, build_model, predict_logits, to_float

if TYPE_CHECKING:  # annotations only: `predict` imports this module and need not load data.py
    from image_classifier.data import Split


# Test images the export check runs through ONNX Runtime, against the PyTorch logits evaluate saved for them: a
# broken conversion shows on a few, and ONNX on 10,000 would be a second evaluation.
PARITY_IMAGES = 1000


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


def export_formats(model: ImageClassifier, config: dict[str, Any], opset: int) -> ImageClassifier:
    """The export stage's files: the plain weights, the config that rebuilds the model, the torch.export program
    and the ONNX file converted from it. Returns the copy of `model` that was exported (functional_activations):
    the one to give MLflow, which exports it again."""
    example = example_input(config)
    model = functional_activations(copy.deepcopy(model))
    save_tensors(model.state_dict(), paths.WEIGHTS_FILE)
    with atomic_path(paths.MODEL_CONFIG) as temp:
        temp.write_text(json.dumps(config, indent=2) + "\n")
    # One trace of the model serves both formats.
    program = export_program(model, example, paths.PT2_FILE)
    export_onnx(model, example, paths.ONNX_FILE, opset, onnx_metadata(config), program)
    return model


def functional_activations(model: ImageClassifier) -> ImageClassifier:
    """Turn off `inplace` in the model's activations (timm's ReLU6, ReLU, SiLU), in place: the exporters rewrite
    an in-place activation (`hardtanh_`) into a functional one through reference code with symbolic shapes, which
    took EfficientNet-Lite0's ONNX export from 5 s to 21 s and its torch.export from 2 s to 5 s (2-core AMD
    EPYC). The outputs are the same; eager inference stays faster in place (2.1 s against 3.4 s for 500 images
    at 96 px), so the exporters get a copy."""
    for module in model.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
    return model


def save_test_logits(path: Path, logits: torch.Tensor, model_file: Path) -> None:
    """The PyTorch logits of every test image as evaluate computed them, with the sha256 of the model file that
    computed them: the reference the export check compares ONNX with, so the model runs once on the test set."""
    with atomic_path(path) as temp, temp.open("wb") as file:
        np.savez(file, logits=logits.float().numpy(), model_sha256=file_digest(model_file))


def load_test_logits(path: Path, model_file: Path, images: int) -> np.ndarray:
    """The logits save_test_logits wrote, refused in one line unless they are `model_file`'s, one row a test
    image."""
    rerun = "run the evaluate stage first (dvc repro)"
    try:
        with np.load(path, allow_pickle=False) as saved:
            logits, model_sha256 = saved["logits"], str(saved["model_sha256"])
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: {rerun}") from None
    except Exception as error:  # any corruption: not a zip, not numpy, a key missing
        raise UserError(f"cannot read {path}: {load_failure(error)}; {rerun}") from None
    if model_sha256 != file_digest(model_file):
        raise UserError(f"{path} holds the test logits of another {model_file} than this one: {rerun}")
    if len(logits) != images:
        raise UserError(f"{path} has {len(logits)} rows but the test split {images} images: {rerun}")
    return logits


def check_onnx(reference: np.ndarray, test: "Split", max_logit_diff: float) -> dict[str, float]:
    """The exported ONNX file against `reference` (PyTorch's logits of the `test` split, from evaluate) on up to
    PARITY_IMAGES of its images, evenly spaced: the parity metrics, written to paths.EXPORT_METRICS and
    returned; a UserError, and no metrics file, where ONNX differs by more than export.max_logit_diff."""
    picked = torch.linspace(0, len(test) - 1, min(len(test), PARITY_IMAGES)).round().long()
    sample = test.subset(picked)
    exported = onnx_logits(paths.ONNX_FILE, sample.images, inference_batch_size(torch.device("cpu")))
    parity = parity_report(reference[picked.numpy()], exported, sample.labels)
    failure = parity_failure(parity, max_logit_diff)
    if failure:
        raise UserError(failure)
    with atomic_path(paths.EXPORT_METRICS) as temp:
        temp.write_text(json.dumps(parity, indent=2) + "\n")
    return parity


def export_summary(parity: dict[str, float], registered: dict[str, Any]) -> str:
    """The export stage's closing line: how closely ONNX matched PyTorch, and the registered version."""
    return (
        f"ONNX vs PyTorch on {parity['onnx_checked_images']} test images: max |logit diff| "
        f"{parity['onnx_max_abs_logit_diff']:.2e} ({parity['onnx_max_rel_logit_diff']:.1e} of the logits' scale), "
        f"agreement {parity['onnx_prediction_agreement']:.4f}; "
        f"registered {registered['name']} version {registered['version']} ({registered['decision']})"
    )


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    metadata: dict[str, str] | None = None,
    program: torch.export.ExportedProgram | None = None,
) -> None:
    """ONNX with a dynamic batch dimension, through the torch.export-based exporter; `metadata` goes into the
    model's metadata_props. Given the `program` export_program made of the same model, ONNX is converted from it
    instead of tracing the model a second time (0.5-0.7 s of a small run's export stage, measured here)."""
    source, shapes = (program, None) if program is not None else (model.eval(), _dynamic_batch())
    with atomic_path(path) as temp:
        onnx_program = torch.onnx.export(
            source,
            (example,),
            dynamo=True,
            dynamic_shapes=shapes,
            input_names=["images"],
            output_names=["logits"],
            opset_version=opset,
            verbose=False,
        )
        onnx_program.model.metadata_props.update(metadata or {})
        onnx_program.save(str(temp))


def export_program(model: torch.nn.Module, example: torch.Tensor, path: Path) -> torch.export.ExportedProgram:
    """A torch.export program (.pt2), saved at `path` and returned: runs without the model's Python code, e.g.
    from C++ or AOTInductor."""
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=_dynamic_batch())
    with atomic_path(path) as temp, temp.open("wb") as file:  # a file object: see files.save_tensors
        torch.export.save(program, file)
    return program


def _dynamic_batch() -> dict[str, dict[int, torch.export.Dim]]:
    return {"images": {0: torch.export.Dim("batch", min=1, max=65536)}}


def onnx_parity(
    onnx_path: Path,
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int,
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Run ONNX Runtime and PyTorch over the same uint8 images: parity_report."""
    torch_logits = predict_logits(inference_layout(copy.deepcopy(model)), images, batch_size).numpy()
    return parity_report(torch_logits, onnx_logits(onnx_path, images, batch_size), labels)


def onnx_logits(onnx_path: Path, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """ONNX Runtime's logits for uint8 `images`, in batches of `batch_size`."""
    import onnxruntime  # only export needs it: `predict` starts faster without

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run(["logits"], {"images": to_float(images[start : start + batch_size]).numpy()})[0]
            for start in range(0, len(images), batch_size)
        ]
    )


def parity_report(
    torch_logits: np.ndarray, exported: np.ndarray, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """parity_metrics, and with `labels` the calibration error of the ONNX model's own probabilities (what a
    deployment serves)."""
    parity = parity_metrics(torch_logits, exported)
    if labels is not None:
        from image_classifier.calibration import expected_calibration_error

        probabilities = torch.from_numpy(exported).softmax(dim=1)
        parity["onnx_test_ece"] = expected_calibration_error(probabilities, labels)
    return parity


def parity_metrics(reference: np.ndarray, exported: np.ndarray) -> dict[str, float]:
    """How far `exported` logits are from `reference` ones (N x classes), in the terms parity_failure judges."""
    gap = np.abs(exported.astype(np.float64) - reference)
    # The logits' scale: their largest magnitude, at least 1 (below that float noise is set by the network's
    # activations, not its outputs, and a relative gap would blow up on an untrained model's near-zero logits).
    scale = max(float(np.abs(reference).max(initial=0.0)), 1.0)
    probabilities = _softmax(reference), _softmax(exported)
    top2 = np.sort(reference, axis=1)[:, -2:] if reference.shape[1] > 1 else np.zeros((len(reference), 2))
    margin = top2[:, 1] - top2[:, 0]
    flipped = reference.argmax(1) != exported.argmax(1)
    return {
        "onnx_max_abs_logit_diff": float(gap.max(initial=0.0)),
        "onnx_logit_scale": scale,
        "onnx_max_rel_logit_diff": float(gap.max(initial=0.0)) / scale,
        "onnx_max_prob_diff": float(np.abs(probabilities[0] - probabilities[1]).max(initial=0.0)),
        "onnx_prediction_agreement": float((~flipped).mean()) if len(reference) else 1.0,
        "onnx_disagreements": int(flipped.sum()),
        # How clear the clearest flipped prediction was: PyTorch's top-two margin there, relative to the scale.
        "onnx_max_flipped_margin": float(margin[flipped].max(initial=0.0)) / scale,
        "onnx_checked_images": len(reference),
    }


def parity_failure(parity: dict[str, float], tolerance: float) -> str | None:
    """Why the export is not the model (one line), or None. `tolerance` (export.max_logit_diff) bounds the
    logit gap relative to the logits' scale and the probability gap. That also bounds class agreement: a
    prediction can flip only where PyTorch's top two logits are closer than twice the gap (a near-tie), which
    onnx_max_flipped_margin reports."""
    checks = [
        ("logits differ from PyTorch's by", parity["onnx_max_rel_logit_diff"], "of their scale"),
        ("probabilities differ from PyTorch's by", parity["onnx_max_prob_diff"], ""),
    ]
    for what, value, unit in checks:
        if value > tolerance:
            return (
                f"ONNX {what} {value:.2e}{' ' + unit if unit else ''}, more than export.max_logit_diff = "
                f"{tolerance:g} (largest logit gap {parity['onnx_max_abs_logit_diff']:.2e}, logit scale "
                f"{parity['onnx_logit_scale']:.3g})"
            )
    return None


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True, initial=-np.inf))
    return shifted / shifted.sum(1, keepdims=True)
