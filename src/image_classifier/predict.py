"""`predict`: classify image files or test-set images with a trained model.

predict photo.png shoe.jpg            # any size or colour: converted to the model's input
predict --index 0 1 2                 # test-set images, with their actual class
predict --top 3 --index 0             # the three likeliest classes, one line each
predict --model models/model.pt ...   # another model file
"""

import argparse
from pathlib import Path

import torch

from image_classifier import paths
from image_classifier.errors import UserError, run_cli
from image_classifier.export import load_model
from image_classifier.images import read_image


def load_image(path: Path, image_shape: list[int]) -> torch.Tensor:
    """Read an image file as uint8 C×H×W of the model's shape, exactly as preprocess reads a folder data set."""
    channels, height, width = image_shape
    return read_image(path, channels, (height, width))


def describe(probabilities: torch.Tensor, classes: list[str], actual: int | None) -> str:
    confidence, index = probabilities.max(dim=0)
    line = f'Predicted: "{classes[int(index)]}" ({100 * confidence.item():.1f}%)'
    return line + (f', Actual: "{classes[actual]}"' if actual is not None else "")


def describe_top(probabilities: torch.Tensor, classes: list[str], actual: int | None, k: int) -> list[str]:
    """A heading (how many classes, the actual one if known), then the `k` likeliest classes, likeliest first."""
    values, indices = probabilities.topk(min(k, len(classes)))
    heading = f"top {len(values)} of {len(classes)} classes"
    heading += f', Actual: "{classes[actual]}"' if actual is not None else ""
    ranked = [
        f'  {rank}. "{classes[int(i)]}" ({100 * v.item():.1f}%)'
        for rank, (v, i) in enumerate(zip(values, indices, strict=True), start=1)
    ]
    return [heading, *ranked]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count of classes (1 or more)")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="predict", description="Classify image files or test-set images.")
    parser.add_argument("images", nargs="*", type=Path, help="PNG/JPEG/... files to classify")
    parser.add_argument("--index", nargs="+", type=int, default=[], help="test-set image indices")
    parser.add_argument(
        "--model", type=Path, default=paths.MODEL_FILE, help="model file (default: %(default)s)"
    )
    parser.add_argument(
        "--top",
        type=positive_int,
        metavar="K",
        help="print the K likeliest classes of each image, one per line",
    )
    args = parser.parse_args(argv)
    if not args.images and not args.index:
        parser.error("give image files or --index N ...")

    model, config = load_model(args.model)
    inputs, names, actuals = [], [], []
    for path in args.images:
        inputs.append(load_image(path, config["image_shape"]))
        names.append(str(path))
        actuals.append(None)
    if args.index:
        from image_classifier.data import load_split

        test = load_split(paths.SPLIT_DIRS["test"])
        for index in args.index:
            if not 0 <= index < len(test):
                raise UserError(f"--index {index} is out of range; the test set has {len(test)} images")
            inputs.append(test.images[index])
            names.append(f"test[{index}]")
            actuals.append(int(test.labels[index]))
    with torch.no_grad():
        probabilities = model(torch.stack(inputs).float() / 255).softmax(dim=1)
    for name, row, actual in zip(names, probabilities, actuals, strict=True):
        if args.top:
            heading, *ranked = describe_top(row, config["classes"], actual, args.top)
            print("\n".join([f"{name}: {heading}", *ranked]))
        else:
            print(f"{name}: {describe(row, config['classes'], actual)}")


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
