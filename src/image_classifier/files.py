"""Atomic file writes (an output appears under its final name only once it is complete), and file digests."""

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    import torch  # here, not above: fetch writes files through this module and starts without torch

    with atomic_path(path) as temp, temp.open("wb") as file:
        torch.save(obj, file)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; put it in `path`'s place only if the block succeeds.

    A folder of several files (a split's shards) is then either the old complete one or the new complete one:
    a kill mid-write leaves at worst a hidden `.name.xxxx.tmp` folder beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield temp
        replace_dir(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def replace_dir(new: Path, old: Path) -> None:
    """Put folder `new` where `old` is with two renames, restoring `old` if the second one fails."""
    if not old.exists():
        os.replace(new, old)
        return
    backup = old.with_name(f".{old.name}.{os.getpid()}.old")
    os.replace(old, backup)
    try:
        os.replace(new, old)
    except OSError:
        os.replace(backup, old)
        raise
    shutil.rmtree(backup)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes by `algorithm` ("sha256", "md5", any name hashlib knows), read in chunks:
    a file of any size hashes in bounded memory."""
    with Path(path).open("rb") as file:
        return hashlib.file_digest(file, algorithm).hexdigest()
