"""What the train stage does around `train()`: gather its inputs (the stored splits, the model config, the
weights to start from, the resume checkpoint's path), and on the lead process track the run in MLflow and write
the stage's outputs (the calibrated model, the last checkpoint, the reports)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from image_classifier import params as params_module
from image_classifier import paths, tracking
from image_classifier.backbones import Weights
from image_classifier.calibration import calibrated_state
from image_classifier.data import Meta, Split, load_split
from image_classifier.export import save_model
from image_classifier.files import save_tensors
from image_classifier.models import model_config as model_config_for
from image_classifier.params import Params
from image_classifier.reports import write_reports
from image_classifier.train import TrainResult, train
from image_classifier.train_state import resume_path
from image_classifier.warm_start import resolve


@dataclass
class StageInputs:
    meta: Meta
    train_split: Split
    val_split: Split
    model_config: dict[str, Any]
    pretrained: Weights | None
    init_weights: Path | None  # train.init_from as a local file
    init_what: str  # and what it is, for the run's tags
    data_files: dict[str, Path]
    checkpoint_path: Path


def gather_inputs(params: Params, downloads: Path, lead: bool) -> StageInputs:
    meta = Meta.load(paths.META_FILE)
    model_config, pretrained = model_config_for(
        params.train, meta.dataset, meta.image_shape, meta.classes, meta.mean, meta.std
    )
    model, width = model_config["model"], model_config["width"]
    if lead and (params.train.model == "auto" or (width and params.train.width == "auto")):
        print(f"train.model auto: {model}" + (f", width {width}" if width else ""))
    if lead and pretrained:
        print(pretrained.line())
    data_files = {"train": paths.SPLIT_DIRS["train"], "val": paths.SPLIT_DIRS["val"], "meta": paths.META_FILE}
    init_weights, init_what = None, ""
    if params.train.init_from:
        init_weights, init_what = resolve(params.train.init_from, params.tracking, downloads)
    # The init file's bytes are in the fingerprint: a changed file is not resumed from a stale checkpoint.
    weight_files = [file for file in (init_weights, pretrained and pretrained.file) if file]
    return StageInputs(
        meta=meta,
        train_split=load_split(paths.SPLIT_DIRS["train"]),
        val_split=load_split(paths.SPLIT_DIRS["val"]),
        model_config=model_config,
        pretrained=pretrained,
        init_weights=init_weights,
        init_what=init_what,
        data_files=data_files,
        checkpoint_path=resume_path(paths.RESUME_DIR, params.flat(), [*data_files.values(), *weight_files]),
    )


def run_training(params: Params, inputs: StageInputs, device: torch.device, **hooks: Any) -> TrainResult:
    return train(
        params.train,
        inputs.model_config,
        inputs.train_split,
        inputs.val_split,
        device,
        inputs.checkpoint_path,
        init_weights=inputs.init_weights,
        pretrained=inputs.pretrained,
        **hooks,
    )


def train_and_track(
    params: Params, inputs: StageInputs, device: torch.device, device_name: str
) -> tuple[str, dict[str, float]]:
    """Trains in an MLflow run that gets every epoch, the resolved settings and the outputs; the run's id and
    the metrics."""
    data_files = inputs.data_files
    tags = tracking.source_tags({**data_files, "test": paths.SPLIT_DIRS["test"]}, device_name)
    with tracking.start_run(params.flat(), tags, inputs.checkpoint_path) as run_id:
        for name, split in (("train", inputs.train_split), ("val", inputs.val_split)):
            md5 = tags[f"data.{name}.md5"]
            tracking.log_dataset(split, inputs.meta.dataset, name, paths.SPLIT_DIRS[name], md5)
        result = run_training(params, inputs, device, on_epoch=tracking.epoch_logger(run_id))
        config = inputs.model_config
        tracking.log_resolved(
            {
                "model": config["model"],
                "width": config["width"],
                **dataclasses.asdict(result.plan),
                "stopped_early": result.stopped_early,
                "precision": result.precision,
                "data_in_memory": result.data_mode.in_memory,
                "data_mode": result.data_mode.line,
            }
        )
        if result.warm_start:
            tracking.log_warm_start(result.warm_start.as_dict(), inputs.init_what)
        if inputs.pretrained:
            tracking.log_pretrained(inputs.pretrained)
        metrics = save_outputs(params, inputs, result)
        tracking.write_run_file(paths.RUN_FILE, run_id)
    return run_id, metrics


def save_outputs(params: Params, inputs: StageInputs, result: TrainResult) -> dict[str, float]:
    """The calibrated model, the last checkpoint and the reports, logged to the active run."""
    # Fitted after training, with the best weights: training itself always runs at temperature 1.
    state, calibration = calibrated_state(
        inputs.model_config, result.best_state, inputs.val_split, params.train.calibrate
    )
    save_model(paths.MODEL_FILE, inputs.model_config, state)
    save_tensors(result.final_checkpoint, paths.CHECKPOINT_FILE)
    metrics = write_reports(
        result, paths.TRAIN_HISTORY, paths.TRAIN_METRICS, paths.TRAIN_CURVES_PNG, calibration
    )
    tracking.log_results(
        metrics,
        [paths.TRAIN_CURVES_PNG, paths.TRAIN_HISTORY, paths.TRAIN_METRICS, params_module.PARAMS_FILE],
        folder="train",
    )
    return metrics
