"""What a finished training writes: the per-epoch history (a DVC plots file), the summary metrics (a DVC metrics
file) and a curves PNG; and the line each epoch prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from image_classifier.files import atomic_path

if TYPE_CHECKING:
    from image_classifier.train import TrainResult


def epoch_line(stats: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {stats['epoch']}/{epochs}: train loss {stats['train_loss']:.4f} "
        f"acc {stats['train_accuracy']:.4f} | val loss {stats['val_loss']:.4f} acc {stats['val_accuracy']:.4f} | "
        f"{stats['epoch_seconds']:.1f}s, {stats['samples_per_second']:.0f}/s"
    )


def write_reports(
    result: TrainResult,
    history_csv: Path,
    metrics_json: Path,
    curves_png: Path,
    extra: dict[str, float] | None = None,
) -> dict[str, float]:
    """The history CSV, the metrics JSON (with `extra` such as the calibration's) and the curves PNG; returns
    the metrics."""
    columns = list(result.history[0])
    rows = [",".join(columns)] + [",".join(f"{row[c]:.6g}" for c in columns) for row in result.history]
    with atomic_path(history_csv) as temp:
        temp.write_text("\n".join(rows) + "\n")
    metrics = {
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "epochs_trained": len(result.history),
        "final_train_loss": result.history[-1]["train_loss"],
        "train_seconds": sum(row["epoch_seconds"] for row in result.history),
        "compile_seconds": result.compile_seconds,
        **(extra or {}),
    }
    with atomic_path(metrics_json) as temp:
        temp.write_text(json.dumps(metrics, indent=2) + "\n")
    # Here, not at the top: matplotlib is absent where the GPU benchmark trains (only torch is installed).
    from image_classifier.plots import save_training_curves

    save_training_curves(result.history, curves_png)
    return metrics
