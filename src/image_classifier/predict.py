"""`predict`: classify image files, folders and test-set images with any model the project makes.

predict photo.png shoe.jpg                 # any size or colour: converted to the model's input
predict scans/ 'drops/**/*.jpg'            # folders (recursive) and patterns, in sorted order
predict scans/ --out predictions.csv       # a file for programs (.csv or .jsonl), written atomically
predict --index 0 1 2                      # test-set images, with their actual class
predict --top 3 --index 0                  # the three likeliest classes, one line each
predict --model models/export/model.onnx   # the exported ONNX model, run by ONNX Runtime
predict --model models:/fashion-mnist-classifier@champion ...   # a registered model, from the MLflow store

Exit status: 0 when every image was classified, 1 when some could not be read (each is named on stderr and has
an error in --out), 2 for bad usage (a missing model or path, an empty folder, an output that cannot be written),
and 2 when not one image could be read.
"""

import argparse
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from image_classifier import paths
from image_classifier.batch_predict import Decoded, Row, classify, decode_iter
from image_classifier.errors import UserError, run_cli, warn_each
from image_classifier.image_files import find_inputs
from image_classifier.prediction_files import check_output, prediction_writer
from image_classifier.predictors import load_predictor

# Images per model call: enough to amortise each call, small enough to stay under 40 MB at 3×224×224.
BATCH_SIZE = 64
# Classes per row in an --out file when --top is not given.
FILE_TOP = 5
MAX_LISTED = 10  # unreadable files named one by one on stderr; the rest are counted


def describe(row: Row) -> str:
    name, confidence = row.top[0]
    line = f'Predicted: "{name}" ({100 * confidence:.1f}%)'
    return line + (f', Actual: "{row.actual}"' if row.actual is not None else "")


def describe_top(row: Row, classes: int) -> list[str]:
    """A heading (how many classes, the actual one if known), then the likeliest classes, likeliest first."""
    heading = f"top {len(row.top)} of {classes} classes"
    heading += f', Actual: "{row.actual}"' if row.actual is not None else ""
    ranked = [f'  {rank}. "{name}" ({100 * p:.1f}%)' for rank, (name, p) in enumerate(row.top, start=1)]
    return [heading, *ranked]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count (1 or more)")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="predict", description="Classify image files, folders or test-set images."
    )
    parser.add_argument(
        "inputs", nargs="*", help="image files, folders (searched recursively) or glob patterns"
    )
    parser.add_argument("--index", nargs="+", type=int, default=[], help="test-set image indices")
    parser.add_argument(
        "--model",
        default=str(paths.MODEL_FILE),
        help="a .pt model file, an exported .onnx, or models:/<name>@<alias>, models:/<name>/<version>, "
        "runs:/<id>/model (default: %(default)s)",
    )
    parser.add_argument("--top", type=positive_int, metavar="K", help="the K likeliest classes of each image")
    parser.add_argument("--out", type=Path, help="write predictions to this .csv or .jsonl file")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help="images per model call")
    parser.add_argument("--workers", type=positive_int, help="decoding threads (default: one per core)")
    args = parser.parse_args(argv)
    if not args.inputs and not args.index:
        parser.error("give image files, folders or --index N ...")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out:
        check_output(args.out)  # before minutes of work, not after
    files = find_inputs(args.inputs)
    predictor = load_predictor(args.model)
    channels, height, _ = predictor.image_shape  # square: data.image_size is one number
    names = [str(path) for path in files]
    decoded: Iterator[Decoded] = decode_iter(files, channels, height, args.workers)
    actual: dict[int, str] = {}
    if args.index:
        names, decoded = _with_test_images(args.index, names, decoded, predictor.classes, actual)
    top = args.top or (min(FILE_TOP, len(predictor.classes)) if args.out else 1)
    rows = classify(names, decoded, predictor, args.batch_size, top)
    # A bar on a terminal only (disable=None); leave=False: it is gone once the rows are out.
    rows = tqdm(
        rows, total=len(names), desc="predict", unit="img", disable=None, leave=False, file=sys.stderr
    )
    failed: list[Row] = []
    if args.out:
        with prediction_writer(args.out, top) as write:
            for row in rows:
                write(row)
                failed += [row] if row.error else []
            _check_any_read(failed, len(names))  # raising here leaves no file
    else:
        for position, row in enumerate(rows):
            row.actual = actual.get(position)
            failed += [row] if row.error else []
            if not row.error:
                print(_printed(row, args.top, len(predictor.classes)))
        _check_any_read(failed, len(names))
    _report(failed, len(names), args.out, predictor.source)


def _with_test_images(
    indices: list[int],
    names: list[str],
    decoded: Iterator[Decoded],
    classes: list[str],
    actual: dict[int, str],
) -> tuple[list[str], Iterator[Decoded]]:
    """The test-set images `indices` after the files, with their true classes in `actual` by position."""
    from image_classifier.data import load_split

    test = load_split(paths.SPLIT_DIRS["test"])
    for index in indices:
        if not 0 <= index < len(test):
            raise UserError(f"--index {index} is out of range; the test set has {len(test)} images")
    start = len(names)
    actual.update({start + i: classes[int(test.labels[index])] for i, index in enumerate(indices)})
    images = ((start + i, test.images[index].numpy(), None) for i, index in enumerate(indices))
    return names + [f"test[{index}]" for index in indices], itertools.chain(decoded, images)


def _printed(row: Row, top: int | None, classes: int) -> str:
    if not top:
        return f"{row.name}: {describe(row)}"
    heading, *ranked = describe_top(row, classes)
    return "\n".join([f"{row.name}: {heading}", *ranked])


def _check_any_read(failed: list[Row], total: int) -> None:
    """Not one image read is bad input (exit 2, one line), as it always was for a single unreadable file."""
    if failed and len(failed) == total:
        first = f"{failed[0].name}: {failed[0].error}"
        raise UserError(
            first if total == 1 else f"none of the {total} images could be read; the first: {first}"
        )


def _report(failed: list[Row], total: int, out: Path | None, source: str) -> None:
    """Unreadable files on stderr (exit status 1), and where the predictions went."""
    if out:
        print(f"{total - len(failed)} of {total} images classified by {source} into {out}", file=sys.stderr)
    if not failed:
        return
    where = f" (all are in {out}, column error)" if out else ""
    lines = [f"{row.name}: {row.error}" for row in failed]
    warn_each(f"{len(failed)} of {total} files could not be read:", lines, MAX_LISTED, where)
    sys.exit(1)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
