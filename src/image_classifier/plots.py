"""PNG figures a person looks at: sample grids, the confusion matrix, the training curves and the reliability
diagram."""

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
import torch

from image_classifier.files import atomic_path

if TYPE_CHECKING:  # plots.py is a dependency of stages that never calibrate: no runtime import
    from image_classifier.calibration import ReliabilityBins


# The largest side an image of a preview grid is drawn at (a column of the figure is 180 pixels wide).
PREVIEW_SIDE = 128


def _save(figure: plt.Figure, path: Path) -> None:
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def save_image_grid(images: torch.Tensor, captions: Sequence[str], path: Path, title: str) -> None:
    """A grid of uint8 images (N×C×H×W), each captioned (class name, or "true → predicted").

    One mosaic in one axes: a subplot per image cost 1.9 s for 36 images, most of the preprocess stage. Images
    larger than PREVIEW_SIDE are shrunk first: the figure shows each in about that many pixels, and matplotlib
    resamples the whole mosaic in float64 (36 photos at 224 px: 311 MB, the preprocess stage's peak).
    """
    images = _thumbnails(images)
    columns = min(6, max(1, len(images)))
    height, width = images.shape[-2:]
    gap = max(2, round(0.4 * height))  # room above each image for a two-line caption
    mosaic = _mosaic(images, columns, gap) if len(images) else None
    aspect = 1.0 if mosaic is None else mosaic.shape[0] / mosaic.shape[1]
    figure, axis = plt.subplots(figsize=(1.8 * columns, 1.8 * columns * aspect))
    axis.axis("off")
    if mosaic is None:
        axis.text(0.5, 0.5, "(no images)", ha="center", va="center")
    else:
        axis.imshow(mosaic.numpy(), interpolation="none")
    for index, caption in enumerate(captions[: len(images)]):
        row, column = divmod(index, columns)
        x = gap + column * (width + gap) + width / 2
        y = gap + row * (height + gap) - 0.05 * gap
        axis.text(x, y, caption, ha="center", va="bottom", fontsize=8)
    axis.set_title(title)
    _save(figure, path)


def _thumbnails(images: torch.Tensor) -> torch.Tensor:
    """`images` shrunk (antialiased) so that neither side exceeds PREVIEW_SIDE; as they are if they fit."""
    height, width = images.shape[-2:]
    scale = PREVIEW_SIDE / max(height, width)
    if scale >= 1 or not len(images):
        return images
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    shrunk = torch.nn.functional.interpolate(images.float(), size, mode="bilinear", antialias=True)
    return shrunk.round().clamp(0, 255).to(torch.uint8)


def _mosaic(images: torch.Tensor, columns: int, gap: int) -> torch.Tensor:
    """uint8 N×C×H×W images as one H'×W'×3 picture, `gap` white pixels around each (the layout of torchvision's
    make_grid, without importing torchvision: a second of start-up for the evaluate stage)."""
    count, _, height, width = images.shape
    rows = -(-count // columns)
    canvas = torch.full(
        (gap + rows * (height + gap), gap + columns * (width + gap), 3), 255, dtype=torch.uint8
    )
    for index, image in enumerate(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images):
        row, column = divmod(index, columns)
        top, left = gap + row * (height + gap), gap + column * (width + gap)
        canvas[top : top + height, left : left + width] = image.permute(1, 2, 0)
    return canvas


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


def save_reliability_diagram(bins: "ReliabilityBins", ece: float, path: Path) -> None:
    """Accuracy against confidence per confidence bin, each bar labelled with its image count, and the diagonal
    a calibrated model sits on. The hatched red part of a bar is its gap to the bin's mean confidence: above the
    blue, over-confident; over it, under-confident."""
    filled = bins.count > 0  # empty bins have no accuracy to draw
    left, width = bins.edges[:-1][filled].numpy(), float(bins.edges[1] - bins.edges[0])
    accuracy, confidence = bins.accuracy[filled].numpy(), bins.confidence[filled].numpy()
    figure, axis = plt.subplots(figsize=(5.5, 5.5))
    bar = {"width": width, "align": "edge"}
    axis.bar(left, accuracy, color="tab:blue", edgecolor="black", label="accuracy", **bar)
    # Hatched, not filled: an under-confident bin's gap lies over its accuracy bar and must stay readable.
    gap = {"fill": False, "hatch": "///", "edgecolor": "tab:red", "label": "gap to mean confidence"}
    axis.bar(left, confidence - accuracy, bottom=accuracy, **gap, **bar)
    axis.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
    # Counts in a row above the plot, where no bar or the diagonal can hide them.
    for x, count in zip(left, bins.count[filled].tolist(), strict=True):
        axis.text(x + width / 2, 1.02, str(count), ha="center", va="bottom", fontsize=7, rotation=90)
    axis.set(xlim=(0, 1), ylim=(0, 1.14), xlabel="confidence (top-1 probability)", ylabel="accuracy")
    axis.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axis.set_title(f"Reliability (test set): ECE {ece:.4f}; numbers: images per bin", fontsize=10)
    axis.legend(loc="lower right", fontsize=8)
    _save(figure, path)
