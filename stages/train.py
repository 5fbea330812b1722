"""Stage 3: train the model `train.model` names, log every epoch to MLflow, keep the best by validation accuracy,
then fit its temperature on the validation split (train.calibrate)."""

import dataclasses
import functools
import tempfile
from pathlib import Path

from image_classifier import params as params_module
from image_classifier.errors import run_cli


def main() -> None:
    params = params_module.load()
    # Heavy imports (torch, MLflow) only once params are valid: a typo fails in a fraction of a second.
    from image_classifier.backbones import check_architecture, is_timm

    if is_timm(params.train.model):  # an unknown timm name fails before MLflow and the data are touched
        check_architecture(params.train.model)

    from image_classifier import distributed, paths, run_states, tracking
    from image_classifier.calibration import calibrated_state
    from image_classifier.data import Meta, load_split
    from image_classifier.device import describe, pick_device, set_threads
    from image_classifier.export import save_model
    from image_classifier.files import save_tensors
    from image_classifier.models import model_config as model_config_for
    from image_classifier.train import resume_path, train, write_reports
    from image_classifier.warm_start import resolve

    if params.train.processes * params.train.nodes > 1 and not distributed.is_worker():
        distributed.relaunch(params.train.processes, params.train.nodes)  # reruns this script under torchrun
    set_threads(params.train.threads, params.train.processes)
    device = distributed.local_device(pick_device(params.train.device))
    with distributed.process_group(device) as (rank, world), tempfile.TemporaryDirectory() as downloads:
        lead = rank == 0  # only the first process reports, logs and writes outputs
        if lead:
            print(f"training on {describe(device)}" + (f", {world} processes" if world > 1 else ""))
            tracking.connect(params.tracking)  # fail now, not after training, if the store is unreachable

        meta = Meta.load(paths.META_FILE)
        train_split, val_split = load_split(paths.SPLIT_DIRS["train"]), load_split(paths.SPLIT_DIRS["val"])
        model_config, pretrained = model_config_for(
            params.train, meta.dataset, meta.image_shape, meta.classes, meta.mean, meta.std
        )
        model, width = model_config["model"], model_config["width"]
        if lead and (params.train.model == "auto" or (width and params.train.width == "auto")):
            print(f"train.model auto: {model}" + (f", width {width}" if width else ""))
        if lead and pretrained:
            print(pretrained.line())
        data_files = {
            "train": paths.SPLIT_DIRS["train"],
            "val": paths.SPLIT_DIRS["val"],
            "meta": paths.META_FILE,
        }
        init_weights, init_what = None, ""
        if params.train.init_from:
            init_weights, init_what = resolve(params.train.init_from, params.tracking, Path(downloads))
        # The init file's bytes are in the fingerprint: a changed file is not resumed from a stale checkpoint.
        weight_files = [file for file in (init_weights, pretrained and pretrained.file) if file]
        checkpoint_path = resume_path(paths.RESUME_DIR, params.flat(), [*data_files.values(), *weight_files])

        # Every process trains; only the lead also reports each epoch to MLflow.
        run_training = functools.partial(
            train,
            params.train,
            model_config,
            train_split,
            val_split,
            device,
            checkpoint_path,
            init_weights=init_weights,
            pretrained=pretrained,
        )
        if not lead:
            run_training()
            return
        tags = tracking.source_tags({**data_files, "test": paths.SPLIT_DIRS["test"]}, describe(device))
        with tracking.start_run(params.flat(), tags, checkpoint_path) as run_id:
            tracking.log_dataset(
                train_split, meta.dataset, "train", paths.SPLIT_DIRS["train"], tags["data.train.md5"]
            )
            tracking.log_dataset(
                val_split, meta.dataset, "val", paths.SPLIT_DIRS["val"], tags["data.val.md5"]
            )
            result = run_training(on_epoch=tracking.epoch_logger(run_id))
            tracking.log_resolved(
                {
                    "model": model,
                    "width": width,
                    **dataclasses.asdict(result.plan),
                    "stopped_early": result.stopped_early,
                    "data_in_memory": result.data_mode.in_memory,
                    "data_mode": result.data_mode.line,
                }
            )
            if result.warm_start:
                tracking.log_warm_start(result.warm_start.as_dict(), init_what)
            if pretrained:
                tracking.log_pretrained(pretrained)
            # Fitted after training, with the best weights: training itself always runs at temperature 1.
            state, calibration = calibrated_state(
                model_config, result.best_state, val_split, params.train.calibrate
            )
            save_model(paths.MODEL_FILE, model_config, state)
            save_tensors(result.final_checkpoint, paths.CHECKPOINT_FILE)
            metrics = write_reports(
                result, paths.TRAIN_HISTORY, paths.TRAIN_METRICS, paths.TRAIN_CURVES_PNG, calibration
            )
            tracking.log_results(
                metrics,
                [paths.TRAIN_CURVES_PNG, paths.TRAIN_HISTORY, paths.TRAIN_METRICS, params_module.PARAMS_FILE],
                folder="train",
            )
            tracking.write_run_file(paths.RUN_FILE, run_id)
        run_states.forget(checkpoint_path)  # training completed: the scratch checkpoint has done its job
        print(
            f"best validation accuracy {metrics['best_val_accuracy']:.4f} at epoch {metrics['best_epoch']}, "
            f"{metrics['train_seconds']:.1f}s of training; MLflow run {run_id}"
        )


if __name__ == "__main__":
    run_cli(main)
