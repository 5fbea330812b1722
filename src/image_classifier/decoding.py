"""Decode many image files with every core, in order, straight into one file on disk, with a progress bar.

Each worker process decodes with the same `read_image` that `predict` uses and writes each image straight into its
place in one output file (its position in the list), so memory stays bounded whatever the number of images, the
bytes written do not depend on the number of workers, and only a flag per image travels between processes.
"""

import math
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

# Below this many images one process decodes them about as soon as a pool could start and hand them out.
PARALLEL_FROM = 2_000
# Files handed to a worker at a time: few round trips, yet the progress bar still moves smoothly.
CHUNK = 16
# What decoding one file gives back: (error, grey), error None when it decoded.
Result = tuple[str | None, bool]


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
    `failures`. Each worker writes its images into their places itself: only a few bytes per image travel back."""
    depth = 1 if channels == 1 else 3
    shape = (len(paths), depth, size, size)
    with out.open("wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": shape})
        start = file.tell()
        file.truncate(start + math.prod(shape))  # zeros until written (sparse on disk)
    record = depth * size * size
    tasks = [(str(path), channels, size, str(out), start + i * record) for i, path in enumerate(paths)]
    decoded = Decoded(np.zeros(len(paths), bool), np.zeros(len(paths), bool))
    with _results(tasks, worker_count(len(paths), workers)) as results:
        # Rate and time left on a terminal; none in a log file (disable=None), where it would be noise.
        bar = tqdm(results, total=len(paths), desc="decoding", unit="img", mininterval=1, disable=None)
        for position, (error, grey) in enumerate(bar):
            if error is None:
                decoded.ok[position], decoded.grey[position] = True, grey
            else:
                decoded.failures.append(error)
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
            _close_outputs()
        return
    # fork, as torch's DataLoader does (a spawned worker spends seconds importing torch again), with one torch
    # thread in each worker, as DataLoader's have: a forked child must not use the parent's OpenMP thread pool.
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    with context.Pool(workers, initializer=_one_thread) as pool:
        yield pool.imap(decode_one, tasks, chunksize=CHUNK)  # leaving the block terminates every worker


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: threads inside each would only compete


def decode_one(task: tuple[str, int | str, int, str, int]) -> Result:
    """(error, grey) for one file, whose pixels (uint8 C×size×size) are written into the output at `offset`."""
    from image_classifier.images import read_image

    path, channels, size, out, offset = task
    try:
        image = read_image(Path(path), channels, (size, size))
    except UserError as error:
        return str(error), False
    depth = 1 if channels == 1 else 3
    os.pwrite(_output(out), np.broadcast_to(image.numpy(), (depth, size, size)).tobytes(), offset)
    return None, channels == "auto" and image.shape[0] == 1


# This process's descriptors of output files, by path and inode (a new file at the same path is another file).
_outputs: dict[tuple[str, int], int] = {}


def _output(path: str) -> int:
    key = (path, os.stat(path).st_ino)
    if key not in _outputs:
        _outputs[key] = os.open(path, os.O_WRONLY)
    return _outputs[key]


def _close_outputs() -> None:
    while _outputs:
        os.close(_outputs.popitem()[1])
