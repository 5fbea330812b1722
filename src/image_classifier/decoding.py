"""Decode many image files with every core, in order, straight into one file on disk, with a progress bar.

Each worker process decodes with the same `read_image` that `predict` uses; the results come back in the files'
order and are written to disk as they arrive, so memory stays bounded whatever the number of images, and the
bytes written do not depend on the number of workers.
"""

import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from image_classifier.errors import UserError

# Starting a worker costs about 2 s here (each imports torch and torchvision): below this many images one
# process decodes them sooner than two could start.
PARALLEL_FROM = 2_000
# Files handed to a worker at a time: few round trips, yet the progress bar still moves smoothly.
CHUNK = 16
# What decoding one file gives: (error, pixels C×H×W, grey), error None when it decoded.
Result = tuple[str | None, np.ndarray | None, bool]


@dataclass
class Decoded:
    """Which files decoded (by position), whether each decoded image was grey, and why the others did not."""

    ok: np.ndarray  # bool, one per file
    grey: np.ndarray  # bool, one per file (False for a file that did not decode)
    failures: list[str] = field(default_factory=list)


def worker_count(files: int, workers: int | None = None) -> int:
    """`workers`, or every core this process may use once there are PARALLEL_FROM files or more."""
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if files >= PARALLEL_FROM else 1


def decode_files(
    paths: list[Path],
    channels: int | Literal["auto"],
    size: int,
    out: Path,
    workers: int | None = None,
) -> Decoded:
    """Decode every file of `paths` as uint8 size×size images into `out`, an `.npy` file of len(paths) images in
    `paths` order: 1 channel for `channels` 1, else 3 (for "auto", a grey image's value three times; the
    caller keeps one channel when every image was grey). An unreadable file's place stays black and is named in
    `failures`."""
    depth = 1 if channels == 1 else 3
    shape = (len(paths), depth, size, size)
    decoded = Decoded(np.zeros(len(paths), bool), np.zeros(len(paths), bool))
    blank = bytes(depth * size * size)
    count = worker_count(len(paths), workers)
    tasks = [(str(path), channels, size) for path in paths]
    with out.open("wb") as file, _results(tasks, count) as results:
        np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": shape})
        # Rate and time left on a terminal; none in a log file (disable=None), where it would be noise.
        bar = tqdm(results, total=len(paths), desc="decoding", unit="img", mininterval=1, disable=None)
        for position, (error, pixels, grey) in enumerate(bar):
            if error is not None:
                decoded.failures.append(error)
                file.write(blank)
                continue
            decoded.ok[position], decoded.grey[position] = True, grey
            file.write(np.broadcast_to(pixels, shape[1:]).tobytes())
        bar.close()
    return decoded


@contextmanager
def _results(tasks: list[tuple[str, int | str, int]], workers: int) -> Iterator[Iterator[Result]]:
    """decode_one's result for each task, in order: in this process, or from a pool of `workers` processes."""
    if workers == 1:
        import torch

        # One small image is too little work to share: torch's threads only wait on each other (measured here:
        # 0.4 ms an image on one thread, 21 ms on two while another process kept the other core busy).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield map(decode_one, tasks)
        finally:
            torch.set_num_threads(threads)
        return
    # spawn, not fork: the parent may already run torch's thread pools, which a forked child inherits broken.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
        yield pool.imap(decode_one, tasks, chunksize=CHUNK)  # leaving the block terminates every worker


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: threads inside each would only compete


def decode_one(task: tuple[str, int | str, int]) -> Result:
    """(error, pixels, grey) for one file: pixels uint8 C×size×size, or the reason it cannot be decoded."""
    from image_classifier.images import read_image

    path, channels, size = task
    try:
        image = read_image(Path(path), channels, (size, size))
    except UserError as error:
        return str(error), None, False
    grey = channels == "auto" and image.shape[0] == 1
    return None, image.numpy(), grey
