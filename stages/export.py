"""Stage 5: weights, ONNX (checked against PyTorch on the whole test set), torch.export, registered MLflow model."""

import json

from image_classifier import params as params_module
from image_classifier.errors import UserError, run_cli


def main() -> None:
    params = params_module.load()
    # Heavy imports (torch, MLflow, ONNX) only once params are valid: a typo fails in a fraction of a second.
    from image_classifier import paths, tracking
    from image_classifier.data import load_split
    from image_classifier.export import (
        example_input,
        export_onnx,
        export_program,
        load_model,
        onnx_metadata,
        onnx_parity,
        parity_failure,
    )
    from image_classifier.files import atomic_path, save_tensors

    tracking.connect(params.tracking)
    # The whole stage runs inside the training's run: a failure or an interruption marks it (stage.export).
    with tracking.resume_run(paths.RUN_FILE, "export"):
        model, config = load_model(paths.MODEL_FILE)
        example = example_input(config)

        save_tensors(model.state_dict(), paths.WEIGHTS_FILE)
        with atomic_path(paths.MODEL_CONFIG) as temp:
            temp.write_text(json.dumps(config, indent=2) + "\n")
        # One trace of the model serves both formats.
        program = export_program(model, example, paths.PT2_FILE)
        export_onnx(model, example, paths.ONNX_FILE, params.export.opset, onnx_metadata(config), program)
        test = load_split(paths.SPLIT_DIRS["test"])
        parity = onnx_parity(paths.ONNX_FILE, model, test.images, batch_size=1000, labels=test.labels)
        failure = parity_failure(parity, params.export.max_logit_diff)
        if failure:
            raise UserError(failure)

        with atomic_path(paths.EXPORT_METRICS) as temp:
            temp.write_text(json.dumps(parity, indent=2) + "\n")

        test_accuracy = json.loads(paths.EVAL_METRICS.read_text())["accuracy"]
        tracking.log_results(
            parity, [paths.ONNX_FILE, paths.MODEL_CONFIG, paths.EXPORT_METRICS], folder="export"
        )
        registered = tracking.log_and_register_model(
            model,
            example,
            tracking.model_name(params.tracking, config["dataset"], params.data.path),
            test_accuracy,
            config,
        )
    print(
        f"ONNX vs PyTorch on {parity['onnx_checked_images']} test images: max |logit diff| "
        f"{parity['onnx_max_abs_logit_diff']:.2e} ({parity['onnx_max_rel_logit_diff']:.1e} of the logits' scale), "
        f"agreement {parity['onnx_prediction_agreement']:.4f}; "
        f"registered {registered['name']} version {registered['version']} ({registered['decision']})"
    )


if __name__ == "__main__":
    run_cli(main)
