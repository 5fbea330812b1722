"""Decode many image files with every core, in order, in bounded memory, two ways. Both run `images.read_array`
(Pillow and numpy only, never torch or MLflow), the decoder `predict` uses, so a model sees the same pixels in
training and in use.

- `decode_iter`: the pixels, to the caller, from threads (`predict`, small folders decoded in memory).

    for index, pixels, error in decode_iter(paths, channels=3, size=(128, 128)):
        ...  # index into paths, in order; pixels uint8 C×H×W or None; error: why not (one line) or None

- `fill_shards`: preprocess's path. Worker processes decode straight into the shard files (`os.pwrite` at each
  image's place), so no pixel crosses a pipe or the stage's memory. Threads could not use two cores for this:
  read_array's Python parts hold the GIL, and 2 threads decoded 128-px JPEGs at 0.88x one thread; 2 processes at
  1.7x, 1.45x writing their shards (2-core AMD EPYC; returning the pixels through the pool's pipe: 0.6x).

Processes that cannot deadlock the ways a forked pool did here (issue 25): they come from a `forkserver` that
imports only this module (no fork after torch and MLflow started threads; the stage's SIGTERM handler is not
inherited), and the pool is shut down and joined, never terminated, on the normal path. A Ctrl-C reaches the
stage, which stops the pool: the workers ignore SIGINT.
"""

import itertools
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
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
# fill_shards: below this many images the stage decodes them itself (a forkserver and its workers start in about
# 0.2 s, in which one process decodes, stores and counts about 1,000 128-px JPEGs); images per task sent to a worker.
PROCESSES_FROM = 2_000
TASK_IMAGES = 64
# Tasks queued per worker: enough work to keep the workers busy while the stage counts a finished shard's pixels
# (0.2 s for 256 MB); results are a few bytes an image, so the queue costs no memory.
TASKS_AHEAD = 16

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
    with ThreadPoolExecutor(count, thread_name_prefix="decode") as pool:  # joined, never abandoned
        tasks = ((i, path, channels, shape) for i, path in enumerate(paths))
        yield from _in_order(pool, _decode, tasks, count * AHEAD_PER_WORKER)


def _in_order(pool: Executor, function: Callable, tasks: Iterable[tuple], ahead: int) -> Iterator:
    """`function(*task)` for each of `tasks` in `pool`, at most `ahead` submitted at a time, the results in order.
    Stopping early (break, an exception) cancels what is queued; the pool's shutdown waits for what runs."""
    pending: deque[Future] = deque()
    queued = iter(tasks)
    try:
        for task in itertools.islice(queued, ahead):
            pending.append(pool.submit(function, *task))
        while pending:
            result = pending.popleft().result()
            following = next(queued, None)
            if following is not None:
                pending.append(pool.submit(function, *following))
            yield result
    finally:
        for future in pending:
            future.cancel()


def _decode(index: int, path: Path, channels: int | str, size: tuple[int, int]) -> Decoded:
    try:
        return index, read_array(Path(path), channels, size), None
    except UserError as error:
        return index, None, str(error)


Outcome = tuple[bool, str | None]  # one file in a shard: (grey, None) once decoded, (False, why not) if not


@dataclass
class FilledShard:
    """One shard file after fill_shards: the positions of its files that were decoded (the file holds exactly
    these, in order), why the others were not, whether every decoded image was grey, and (where asked) the
    counts of each channel's 256 values over its decoded images."""

    kept: list[int]
    errors: list[str]
    grey: bool
    histograms: np.ndarray | None


def fill_shards(
    shards: Sequence[tuple[Path, Sequence[Path], bool]],
    channels: int | Literal["auto"],
    size: int,
    depth: int,
    workers: int | None = None,
) -> Iterator[FilledShard]:
    """For each (shard file, image files, count) in `shards`: decode the files as uint8 `depth`×size×size (a grey
    image of an "auto" folder fills all `depth` channels) into a new `.npy` file of that name, in order, counting
    their pixel values if `count`; files that cannot be decoded are left out (the shard is rewritten without
    them). Yields each shard's FilledShard once its file is complete, in order. TASKS_AHEAD tasks of TASK_IMAGES
    a worker are queued; the stage's memory holds no pixels."""
    shape = (depth, size, size)
    tasks, owners = [], []
    for number, (shard, files, count) in enumerate(shards):
        offset = _create_npy(shard, (len(files), *shape))
        for first in range(0, len(files), TASK_IMAGES):
            chunk = [str(file) for file in files[first : first + TASK_IMAGES]]
            tasks.append((str(shard), offset, first, chunk, channels, shape, count))
            owners.append(number)
    filled = [
        FilledShard([], [], True, np.zeros((depth, 256), np.int64) if count else None) for *_, count in shards
    ]
    outcomes: list[list[Outcome]] = [[] for _ in shards]
    left = [0] * len(shards)
    for owner in owners:
        left[owner] += 1
    done = 0
    images = sum(len(files) for _, files, _ in shards)
    for owner, (result, histograms) in zip(owners, _run_tasks(tasks, workers, images), strict=True):
        outcomes[owner] += result
        if histograms is not None:
            filled[owner].histograms += histograms
        left[owner] -= 1
        while done < len(shards) and left[done] == 0:
            yield _finish_shard(shards[done][0], outcomes[done], filled[done])
            outcomes[done] = []
            done += 1
    while done < len(shards):  # shards without files
        yield _finish_shard(shards[done][0], outcomes[done], filled[done])
        done += 1


def _run_tasks(
    tasks: list[tuple], workers: int | None, images: int
) -> Iterator[tuple[list[Outcome], np.ndarray | None]]:
    """Each task's outcomes, in order: in this process for a small set, else in a pool of worker processes."""
    count = workers or (len(os.sched_getaffinity(0)) if images >= PROCESSES_FROM else 1)
    if count == 1 or len(tasks) <= 1:
        yield from (_fill(*task) for task in tasks)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(count, mp_context=context, initializer=_ignore_interrupts) as pool:
        yield from _in_order(pool, _fill, tasks, count * TASKS_AHEAD)


def _ignore_interrupts() -> None:
    # Ctrl-C goes to the whole process group: the stage handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _create_npy(path: Path, shape: tuple[int, ...]) -> int:
    """An uninitialised uint8 `.npy` file of `shape` (numpy's header, then the sparse data): the byte offset of
    its data. The header is the one np.save writes for such an array, so a complete file has the same bytes."""
    with Path(path).open("wb") as file:
        header = {"descr": "|u1", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(file, header)
        offset = file.tell()
        file.truncate(offset + int(np.prod(shape)))
    return offset


def _fill(
    shard: str,
    offset: int,
    first: int,
    files: list[str],
    channels: int | str,
    shape: tuple[int, int, int],
    count: bool,
) -> tuple[list[Outcome], np.ndarray | None]:
    """Decode `files` into `shard`'s images `first`, `first` + 1, ...: an Outcome per file, and if `count` the
    counts of each channel's values over the decoded images. The task's images are gathered in one buffer, then
    written and counted together: a bincount a channel for the task, not per image, halved the counting's cost."""
    images = np.empty((len(files), *shape), np.uint8)
    outcomes: list[Outcome] = []
    for index, file in enumerate(files):
        try:
            pixels = read_array(Path(file), channels, shape[1:])
        except UserError as error:
            outcomes.append((False, str(error)))
            continue
        images[index] = pixels  # a grey image's one channel fills every channel
        outcomes.append((pixels.shape[0] == 1, None))
    decoded = [index for index, (_, error) in enumerate(outcomes) if error is None]
    descriptor = os.open(shard, os.O_WRONLY)
    try:
        for start, stop in _runs(decoded):  # the whole task in one write, unless a file failed
            data = memoryview(images[start:stop]).cast("B")
            if os.pwrite(descriptor, data, offset + (first + start) * images[0].nbytes) != len(data):
                raise OSError(f"short write to {shard} (disk full?)")
    finally:
        os.close(descriptor)
    if not count:
        return outcomes, None
    kept = images if len(decoded) == len(files) else images[decoded]
    histograms = np.stack([np.bincount(kept[:, c].reshape(-1), minlength=256) for c in range(shape[0])])
    return outcomes, histograms


def _runs(indices: list[int]) -> Iterator[tuple[int, int]]:
    """(start, stop) of each run of consecutive numbers in the sorted `indices`."""
    start = None
    for position, index in enumerate(indices):
        if start is None:
            start = index
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            yield start, index + 1
            start = None


def _finish_shard(path: Path, outcomes: list[Outcome], filled: FilledShard) -> FilledShard:
    filled.kept = [i for i, (_, error) in enumerate(outcomes) if error is None]
    filled.errors = [error for _, error in outcomes if error is not None]
    filled.grey = all(outcomes[i][0] for i in filled.kept)
    if filled.errors:  # compact: the decoded images only, in order (one shard, read once)
        images = np.load(path, mmap_mode="r")
        decoded = np.array(images[filled.kept])
        del images
        with Path(path).open("wb") as file:
            np.lib.format.write_array(file, decoded, allow_pickle=False)
    return filled
