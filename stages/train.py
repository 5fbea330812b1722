"""Stage 3: train the model `train.model` names, log every epoch to MLflow, keep the best by validation accuracy,
then fit its temperature on the validation split (train.calibrate)."""

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

    from image_classifier import distributed, run_states, tracking, train_stage
    from image_classifier.device import configure_host, describe, pick_device

    if params.train.processes * params.train.nodes > 1 and not distributed.is_worker():
        distributed.relaunch(params.train.processes, params.train.nodes)  # reruns this script under torchrun
    configure_host(params.train.threads, params.train.processes)
    device = distributed.local_device(pick_device(params.train.device))
    with distributed.process_group(device) as (rank, world), tempfile.TemporaryDirectory() as downloads:
        lead = rank == 0  # only the first process reports, logs and writes outputs
        if lead:
            print(f"training on {describe(device)}" + (f", {world} processes" if world > 1 else ""))
            tracking.connect(params.tracking)  # fail now, not after training, if the store is unreachable
        inputs = train_stage.gather_inputs(params, Path(downloads), lead)
        if not lead:  # every process trains; only the lead tracks the run and writes the outputs
            train_stage.run_training(params, inputs, device)
            return
        run_id, metrics = train_stage.train_and_track(params, inputs, device, describe(device))
    run_states.forget(inputs.checkpoint_path)  # training completed: the scratch checkpoint has done its job
    print(
        f"best validation accuracy {metrics['best_val_accuracy']:.4f} at epoch {metrics['best_epoch']}, "
        f"{metrics['train_seconds']:.1f}s of training; MLflow run {run_id}"
    )


if __name__ == "__main__":
    run_cli(main)
