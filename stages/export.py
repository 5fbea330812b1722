"""Stage 5: weights, ONNX (checked against the PyTorch logits evaluate saved), torch.export, registered MLflow model."""

import json

from image_classifier import params as params_module
from image_classifier.errors import run_cli


def main() -> None:
    params = params_module.load()
    # Heavy imports (torch, MLflow, ONNX) only once params are valid: a typo fails in a fraction of a second.
    from image_classifier import paths, tracking
    from image_classifier.data import load_split
    from image_classifier.export import (
        check_onnx,
        example_input,
        export_formats,
        export_summary,
        load_model,
        load_test_logits,
    )

    tracking.connect(params.tracking)
    # The whole stage runs inside the training's run: a failure or an interruption marks it (stage.export).
    with tracking.resume_run(paths.RUN_FILE, "export"):
        model, config = load_model(paths.MODEL_FILE)
        exported = export_formats(model, config, params.export.opset)
        test = load_split(paths.SPLIT_DIRS["test"])
        reference = load_test_logits(
            paths.TEST_LOGITS, paths.MODEL_FILE, len(test)
        )  # evaluate's PyTorch logits
        parity = check_onnx(reference, test, params.export.max_logit_diff)
        test_accuracy = json.loads(paths.EVAL_METRICS.read_text())["accuracy"]
        tracking.log_results(
            parity, [paths.ONNX_FILE, paths.MODEL_CONFIG, paths.EXPORT_METRICS], folder="export"
        )
        registered = tracking.log_and_register_model(
            exported,
            example_input(config),
            tracking.model_name(params.tracking, config["dataset"], params.data.path),
            test_accuracy,
            config,
        )
    print(export_summary(parity, registered))


if __name__ == "__main__":
    run_cli(main)
