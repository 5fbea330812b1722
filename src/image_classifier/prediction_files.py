"""`predict --out`: predictions as a file a program reads, CSV or JSON Lines, written atomically.

One row per input, in input order: its path, the predicted class and its calibrated probability, the top-k
classes and probabilities, and an error (empty when the file was classified). The file appears under its name
only once complete: a failed or interrupted run leaves no partial file, and the previous one stays as it was.

CSV columns:  path, predicted, probability, top1_class, top1_probability, ..., topK_class, topK_probability, error
JSON Lines:   {"path": ..., "predicted": ..., "probability": ..., "top": [{"class": ..., "probability": ...}],
               "error": null}
"""

import csv
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO

from image_classifier.batch_predict import Row
from image_classifier.errors import UserError
from image_classifier.files import atomic_path

FORMATS = (".csv", ".jsonl")
DIGITS = 6  # probabilities to a millionth: far finer than any calibration is good for


def check_output(path: Path) -> None:
    """Refuse, before any work, an output the run could not finish writing."""
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; name a file in it")
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"--out {path}: write predictions to a .csv or .jsonl file")


@contextmanager
def prediction_writer(path: Path, top: int) -> Iterator[Callable[[Row], None]]:
    """A function that appends one row to `path`'s temporary file; the file is renamed into place when the block
    ends without an error. A place that cannot be written is a UserError at the start, not after the work."""
    check_output(path)
    with ExitStack() as stack:
        try:
            temp = stack.enter_context(atomic_path(path))
            file = stack.enter_context(temp.open("w", newline="", encoding="utf-8"))
        except OSError as error:
            raise UserError(f"--out {path}: cannot write there ({error.strerror or error})") from None
        if path.suffix.lower() == ".csv":
            yield _csv_writer(file, top)
        else:
            yield lambda row: file.write(json.dumps(as_record(row)) + "\n")


def _csv_writer(file: TextIO, top: int) -> Callable[[Row], None]:
    writer = csv.writer(file)
    ranks = [f"top{rank}_{part}" for rank in range(1, top + 1) for part in ("class", "probability")]
    writer.writerow(["path", "predicted", "probability", *ranks, "error"])

    def write(row: Row) -> None:
        ranked = [value for name, p in row.top for value in (name, f"{p:.{DIGITS}f}")]
        ranked += [""] * (len(ranks) - len(ranked))  # a failed file, or fewer classes than K
        writer.writerow([row.name, *ranked[:2], *ranked, row.error or ""])

    return write


def as_record(row: Row) -> dict[str, Any]:
    """A row as JSON: predicted and probability null for a file that could not be read."""
    predicted, probability = row.top[0] if row.top else (None, None)
    return {
        "path": row.name,
        "predicted": predicted,
        "probability": None if probability is None else round(probability, DIGITS),
        "top": [{"class": name, "probability": round(p, DIGITS)} for name, p in row.top],
        "error": row.error,
    }
