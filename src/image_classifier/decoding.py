"""Decode many image files with every core, in order, in bounded memory: `decode_iter`.

Threads, not processes. Pillow releases the GIL while it decodes and resizes, so threads use every core, and
a thread pool cannot deadlock the ways a forked process pool did here (issue 25): no fork after torch and MLflow
started their threads, no worker that inherits the stage's SIGTERM handler, no `Pool.terminate()` racing a
worker for the task queue's lock. Workers run `images.read_array` (Pillow and numpy only, never torch or MLflow),
the same decoder `predict` uses, so a model sees the same pixels in training and in use.

    for index, pixels, error in decode_iter(paths, channels=3, size=(128, 128)):
        ...  # index into paths, in order; pixels uint8 C×H×W or None; error: why not (one line) or None
"""

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np

from image_classifier.errors import UserError
from image_classifier.images import read_array

# Decodes in flight per thread: enough that no thread waits for work while the caller handles a result, few
# enough that memory holds only a handful of decoded images (not the whole list) at any time.
AHEAD_PER_WORKER = 8
# Below this many files one thread decodes them about as soon as a pool could start.
PARALLEL_FROM = 64

Decoded = tuple[int, np.ndarray | None, str | None]


def worker_count(files: int, workers: int | None = None) -> int:
    """`workers`, or one thread per core this process may use once there are PARALLEL_FROM files or more."""
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if files >= PARALLEL_FROM else 1


def decode_iter(
    paths: Sequence[Path],
    channels: int | Literal["auto"],
    size: int | tuple[int, int],
    workers: int | None = None,
) -> Iterator[Decoded]:
    """(index, pixels, error) for each of `paths`, in input order: pixels uint8 `channels`×H×W (size an int for
    square images, or (H, W); channels "auto" gives 1 for a grey image, else 3), or None with a one-line error
    naming the file when it cannot be decoded. At most `workers` × AHEAD_PER_WORKER images are decoded ahead of
    the caller. Stopping early (break, an exception) cancels what is queued and waits for the running decodes:
    no thread outlives the iterator."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    count = worker_count(len(paths), workers)
    if count == 1:
        yield from (_decode(i, path, channels, shape) for i, path in enumerate(paths))
        return
    pool = ThreadPoolExecutor(count, thread_name_prefix="decode")
    pending: deque[Future[Decoded]] = deque()
    try:
        queued = iter(enumerate(paths))
        for i, path in queued:
            pending.append(pool.submit(_decode, i, path, channels, shape))
            if len(pending) >= count * AHEAD_PER_WORKER:
                break
        while pending:
            result = pending.popleft().result()
            following = next(queued, None)
            if following is not None:
                pending.append(pool.submit(_decode, *following, channels, shape))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # joined, never abandoned


def _decode(index: int, path: Path, channels: int | str, size: tuple[int, int]) -> Decoded:
    try:
        return index, read_array(Path(path), channels, size), None
    except UserError as error:
        return index, None, str(error)
