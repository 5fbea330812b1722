"""PNG figures a person looks at: sample grids, the confusion matrix and the training curves."""

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
import torch

from image_classifier.files import atomic_path


def _save(figure: plt.Figure, path: Path) -> None:
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def save_image_grid(images: torch.Tensor, captions: Sequence[str], path: Path, title: str) -> None:
    """A grid of uint8 images (N×C×H×W), each captioned (class name, or "true → predicted")."""
    columns = min(6, max(1, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 2.0 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption in zip(axes.flat, images, captions, strict=False):
        pixels = image.permute(1, 2, 0).squeeze(-1).numpy()
        axis.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255)
        axis.set_title(caption, fontsize=8)
    figure.suptitle(title)
    _save(figure, path)


def save_confusion_matrix(matrix: torch.Tensor, classes: Sequence[str], path: Path) -> None:
    """Counts with true classes as rows, coloured by row share so rare classes read as clearly as common ones."""
    share = matrix.double() / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    size = 1.2 + 0.6 * len(classes)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in zip(
        torch.cartesian_prod(torch.arange(len(classes)), torch.arange(len(classes))),
        matrix.flatten(),
        strict=True,
    ):
        colour = "white" if share[row, column] > 0.5 else "black"
        axis.text(column, row, str(int(count)), ha="center", va="center", fontsize=7, color=colour)
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("Confusion matrix (test set)")
    _save(figure, path)


def save_training_curves(history: Sequence[dict[str, float]], path: Path) -> None:
    """Loss and accuracy per epoch, train against validation."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_axis.plot(epochs, [row[f"{split}_loss"] for row in history], marker="o", label=split)
        accuracy_axis.plot(epochs, [row[f"{split}_accuracy"] for row in history], marker="o", label=split)
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    _save(figure, path)
