"""Atomic file writes: an output appears under its final name only once it is complete."""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash or SIGKILL mid-write leaves the previous file intact and at worst a dot-file beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def save_tensors(obj: Any, path: Path) -> None:
    """`torch.save` to `path`, atomically, through a file object.

    Given a path, torch names the records inside its zip after the file, here a random temporary name: the same
    tensors then differ byte for byte on every run, and DVC reruns every stage after this one.
    """
    with atomic_path(path) as temp, temp.open("wb") as file:
        torch.save(obj, file)
