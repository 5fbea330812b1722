"""Stage 4: test-set metrics, calibration, the confusion matrix, the reliability diagram and misclassified examples,
added to the training run."""

from image_classifier import params as params_module
from image_classifier.errors import run_cli


def main() -> None:
    params = params_module.load()
    # Heavy imports (torch, MLflow) only once params are valid: a typo fails in a fraction of a second.
    import torch

    from image_classifier import paths, tracking
    from image_classifier.data import load_split
    from image_classifier.device import inference_batch_size, inference_layout
    from image_classifier.evaluate import evaluate, flat_metrics
    from image_classifier.export import load_model, save_test_logits

    tracking.connect(params.tracking)
    # The whole stage runs inside the training's run: a failure or an interruption marks it (stage.evaluate).
    with tracking.resume_run(paths.RUN_FILE, "evaluate"):
        model, config = load_model(paths.MODEL_FILE)
        inference_layout(model)
        test = load_split(paths.SPLIT_DIRS["test"])
        batch_size = inference_batch_size(torch.device("cpu"), params.evaluate.batch_size)
        if params.evaluate.batch_size == "auto":
            print(f"evaluate.batch_size auto: {batch_size} images per forward pass on the cpu")
            tracking.log_resolved({"evaluate.batch_size": batch_size})
        outputs = {
            "metrics": paths.EVAL_METRICS,
            "predictions": paths.PREDICTIONS_CSV,
            "confusion": paths.CONFUSION_PNG,
            "misclassified": paths.MISCLASSIFIED_PNG,
            "reliability": paths.RELIABILITY_PNG,
        }
        metrics, logits = evaluate(
            model, test, config["classes"], batch_size, params.evaluate.misclassified, outputs
        )
        save_test_logits(paths.TEST_LOGITS, logits, paths.MODEL_FILE)  # the export check's reference
        tracking.log_dataset(
            test,
            config["dataset"],
            "test",
            paths.SPLIT_DIRS["test"],
            tracking.dvc_md5(paths.SPLIT_DIRS["test"]),
        )
        tracking.log_results(
            flat_metrics(metrics, "test"),
            [paths.EVAL_METRICS, paths.CONFUSION_PNG, paths.MISCLASSIFIED_PNG, paths.RELIABILITY_PNG],
            folder="evaluate",
        )
    print(
        f"test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
        f"ECE {metrics['ece']:.4f} (mean confidence {metrics['mean_confidence']:.4f}), Brier {metrics['brier']:.4f}"
    )


if __name__ == "__main__":
    run_cli(main)
