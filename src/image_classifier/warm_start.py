"""Warm start: begin training from an earlier model's weights wherever the names and shapes agree.

The PyTorch quickstart's `load_state_dict(strict=False)`, made explicit: every key is either loaded, missing
(in the model, not in the file), unexpected (in the file, not in the model) or skipped (same name, other shape:
a 1-channel stem in a 3-channel model, a head for another class count), and the report says which.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from image_classifier import paths
from image_classifier.errors import UserError, load_failure
from image_classifier.files import file_digest
from image_classifier.models import ImageClassifier, build_model

if TYPE_CHECKING:  # annotations only: params.py needs pydantic, absent where the GPU benchmark runs
    from image_classifier.params import TrackingParams

# The input normalisation belongs to the data set being trained on (its meta.json), never to the earlier one;
# the temperature belongs to the earlier weights (fitted after their training) and is fitted again after this one.
FRESH_KEYS = ("mean", "std", "temperature")
# DVC deletes a stage's outputs before running it: these would be gone, or be the run's own result.
TRAIN_OUTPUTS = (paths.MODEL_FILE, paths.CHECKPOINT_FILE)


@dataclass
class WarmStartReport:
    source: str  # train.init_from as written
    file: str  # the weights file read (a download for models:/ URIs)
    sha256: str
    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    skipped: list[str]  # "key (file 4x1x2x2, model 4x3x2x2)"

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in ("matched", "missing", "unexpected", "skipped")}

    def lines(self) -> list[str]:
        counts = ", ".join(f"{n} {name}" for name, n in self.counts().items())
        lines = [f"warm start from {self.source} (sha256 {self.sha256[:12]}): {counts}"]
        for name, label in (
            ("matched", "matched"),
            ("missing", "missing (in the model, not in the file; freshly initialised)"),
            ("unexpected", "unexpected (in the file, not in the model; ignored)"),
            ("skipped", "skipped for a shape mismatch (freshly initialised)"),
        ):
            if getattr(self, name):
                lines.append(f"  {label}: {', '.join(getattr(self, name))}")
        lines.append("  normalisation (mean, std): from this data set's meta.json, not from the file")
        lines.append("  temperature: 1 while training, not the file's (calibrated again afterwards)")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, memory-mapped (nothing copied yet): our model file (models/model.pt),
    a plain state dict (models/export/weights.pt) or a training checkpoint. weights_only: no code runs."""
    try:
        saved = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except FileNotFoundError:
        raise UserError(f"train.init_from: {path} does not exist") from None
    except Exception as error:  # unpickling refused, damaged, or not a zip archive (which mmap needs)
        reason = load_failure(error)
        if "mmap can only be used" in str(error):  # checked before anything is unpickled
            reason = "not a zip-format torch.save file (a plain pickle, the pre-1.6 torch.save format, or not PyTorch)"
        raise UserError(f"train.init_from: cannot load {path}: {reason}") from None
    if isinstance(saved, dict):
        for key in (
            "state_dict",
            "model",
        ):  # model file {config, state_dict}; checkpoint {model, optimizer, ...}
            if isinstance(saved.get(key), dict):
                saved = saved[key]
                break
    if (
        not isinstance(saved, dict)
        or not saved
        or not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in saved.items())
    ):
        raise UserError(
            f"train.init_from: {path} is not a weights file (expected a state dict of names to tensors, "
            f"got {type(saved).__name__})"
        )
    return saved


def resolve(init_from: str, tracking: TrackingParams, downloads: Path) -> tuple[Path, str]:
    """The local weights file `train.init_from` names, and what it is: a path as given, or for a
    `models:/` URI a download into `downloads` and "<name> version <n>"."""
    if init_from.startswith("models:/"):
        from image_classifier import tracking as mlflow_store  # only models:/ needs MLflow

        return mlflow_store.download_registered_weights(init_from, tracking, downloads)
    path = Path(init_from)
    if path.resolve() in {output.resolve() for output in TRAIN_OUTPUTS}:
        raise UserError(
            f"train.init_from: {path} is the train stage's own output, which DVC deletes before training; "
            f"copy it first (cp {path} warm/{path.name}) and point at the copy, or use models:/<name>@<alias>"
        )
    if not path.is_file():
        raise UserError(f"train.init_from: {path} does not exist (a weights file, or models:/<name>@<alias>)")
    return path, str(path)


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def load_initial_weights(
    config: dict[str, Any], path: Path, source: str | None = None
) -> tuple[ImageClassifier, WarmStartReport]:
    """`config`'s model with every tensor of `path` whose name and shape match; the rest as a cold start.

    Call it where a cold start would call `build_model`, right after seeding: it first builds a cold-start model
    (same random draws, so keys not in the file get exactly a cold start's values and the run stays
    bit-reproducible), then builds the real model on the meta device and fills it in one
    `load_state_dict(assign=True)`: loaded tensors keep the memory-mapped file's storage (copy-on-write, the file
    is never written), none is allocated twice. Refuses a file of which nothing matches: surely the wrong one.
    """
    loaded = read_state_dict(path)
    fresh = build_model(config).state_dict()
    matched, skipped = [], []
    for key, tensor in loaded.items():
        if key in fresh and key not in FRESH_KEYS:
            if tensor.shape == fresh[key].shape:
                matched.append(key)
            else:
                skipped.append(f"{key} (file {_shape(tensor)}, model {_shape(fresh[key])})")
    unexpected = [key for key in loaded if key not in fresh]
    missing = [key for key in fresh if key not in loaded and key not in FRESH_KEYS]
    if not any(loaded[key].is_floating_point() for key in matched):
        raise UserError(
            f"train.init_from: no weights in {path} match this model ({len(loaded)} tensors in the file, "
            f"{len(skipped)} with a matching name but another shape); is it the right file?"
        )
    with torch.device("meta"):
        model = build_model(config)
    # dtype: a bf16 file loads into our float32 model as float32; assign would otherwise keep bf16.
    state = {**fresh, **{key: loaded[key].to(fresh[key].dtype) for key in matched}}
    model.load_state_dict(state, assign=True)
    report = WarmStartReport(
        source=source or str(path),
        file=str(path),
        sha256=file_digest(path),
        matched=matched,
        missing=missing,
        unexpected=unexpected,
        skipped=skipped,
    )
    return model, report
