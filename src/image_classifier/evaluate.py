"""Test-set metrics: accuracy, loss, macro F1, per-class precision and recall, the confusion matrix, and how
well the model's confidence matches its accuracy (ECE, NLL, Brier score, a reliability diagram)."""

import csv
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from image_classifier.batches import split_logits
from image_classifier.calibration import calibration_metrics, reliability_bins
from image_classifier.data import Split
from image_classifier.files import atomic_path
from image_classifier.plots import save_confusion_matrix, save_image_grid, save_reliability_diagram


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts with true classes as rows and predicted classes as columns."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(num_classes, -1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Everything evaluate reports, as plain numbers (JSON- and MLflow-ready)."""
    predictions = logits.argmax(dim=1)
    matrix = confusion_matrix(labels, predictions, len(classes)).double()
    true_positives = matrix.diag()
    precision = true_positives / matrix.sum(dim=0).clamp(min=1)
    recall = true_positives / matrix.sum(dim=1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {
        "accuracy": (predictions == labels).double().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "macro_f1": f1.mean().item(),
        # ece, nll (the loss above, under the name calibration papers use), brier, mean_confidence
        **calibration_metrics(logits, labels),
        "per_class": {
            name: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item()}
            for i, name in enumerate(classes)
        },
    }


def flat_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """`test_accuracy`, ..., `test_recall_Ankle_boot`: the few keys MLflow gets for a test run."""
    flat = {f"{prefix}_{key}": value for key, value in metrics.items() if key != "per_class"}
    for name, values in metrics["per_class"].items():
        safe = "".join(ch if ch.isalnum() else "_" for ch in name)
        flat[f"{prefix}_recall_{safe}"] = values["recall"]
    return flat


def write_predictions(
    labels: torch.Tensor, predictions: torch.Tensor, classes: list[str], path: Path
) -> None:
    """One row per test image (`actual`, `predicted` class names): DVC draws its confusion plot from this."""
    with atomic_path(path) as temp, temp.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["actual", "predicted"])
        writer.writerows(
            (classes[a], classes[p]) for a, p in zip(labels.tolist(), predictions.tolist(), strict=True)
        )


def evaluate(
    model: torch.nn.Module,
    test: Split,
    classes: list[str],
    batch_size: int,
    misclassified: int,
    outputs: dict[str, Path],
) -> tuple[dict[str, Any], torch.Tensor]:
    """Score `model` on `test` and write `outputs`: metrics (JSON), predictions (CSV), confusion,
    misclassified and reliability (PNG). Returns the metrics and the logits."""
    logits = split_logits(model, test, batch_size)  # streamed from the mapped shards
    predictions = logits.argmax(dim=1)
    metrics = classification_metrics(logits, test.labels, classes)
    with atomic_path(outputs["metrics"]) as temp:
        temp.write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions(test.labels, predictions, classes, outputs["predictions"])
    matrix = confusion_matrix(test.labels, predictions, len(classes))
    save_confusion_matrix(matrix, classes, outputs["confusion"])
    bins = reliability_bins(logits.softmax(dim=1), test.labels)
    save_reliability_diagram(bins, metrics["ece"], outputs["reliability"])
    wrong = torch.nonzero(predictions != test.labels).flatten()[:misclassified]
    captions = [f"{classes[test.labels[i]]}\n→ {classes[predictions[i]]}" for i in wrong]
    save_image_grid(
        test.images[wrong], captions, outputs["misclassified"], "Misclassified (true → predicted)"
    )
    return metrics, logits
