"""Put a data set's files, decompressed and checksum-verified, into a folder.

Local copies are tried before mirrors, so a machine with the files installed never needs the network.
A file only ever appears under its final name once its sha256 matched: it is written to a dot-file
beside it and renamed, so an interrupted run leaves at worst a stale dot-file, removed by the next run.
"""

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from image_classifier.datasets import DatasetSpec, RemoteFile
from image_classifier.errors import UserError

_CHUNK = 1 << 20
_TEMP_SUFFIX = ".part"
# What a bad source can throw at us; anything else is a bug and should not be reported as "source failed".
_SOURCE_ERRORS = (OSError, EOFError, ValueError, zlib.error, http.client.HTTPException)


class _Rejected(Exception):
    """The bytes arrived but are not the file we want."""


def fetch_dataset(
    spec: DatasetSpec,
    dest: Path,
    local_dirs: Sequence[Path],
    mirrors: Sequence[str],
    timeout_s: float = 30.0,
) -> list[Path]:
    """Make `dest/<name>` exist, decompressed and verified, for every file of `spec`; return those paths.

    Sources are tried in order: each local folder (`<name>.gz` or `<name>`), then each mirror
    (`mirrors`, or `spec.mirrors` when empty). Raises UserError if a file could not be had from any.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    mirrors = list(mirrors) or list(spec.mirrors)
    paths = []
    for remote in spec.files.values():
        target = dest / remote.name
        for stale in dest.glob(f".{remote.name}.*{_TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        # Re-hashing (rather than trusting existence) also catches a file damaged after a crash.
        if not _is_valid(target, remote):
            _fetch_file(remote, target, [Path(d) for d in local_dirs], mirrors, timeout_s)
        paths.append(target)
    return paths


def _fetch_file(
    remote: RemoteFile, target: Path, local_dirs: list[Path], mirrors: list[str], timeout_s: float
) -> None:
    failures, rejections = [], []
    for source in _sources(remote.name, local_dirs, mirrors):
        try:
            _install(source, remote, target, timeout_s)
        except (*_SOURCE_ERRORS, _Rejected) as error:
            failures.append(f"{source}: {_reason(error)}")
            # A missing local copy is the normal case on a machine with network: not worth a line.
            if not isinstance(error, FileNotFoundError):
                rejections.append(f"{remote.name}: rejected {source}: {_reason(error)}")
        else:
            # Worth knowing when a later source saved the day; when none does, the error lists them all.
            for rejection in rejections:
                print(rejection, file=sys.stderr)
            print(f"{remote.name}: verified, from {source}")
            return
    tried = "; ".join(failures) or "no local folders or mirrors to try"
    raise UserError(
        f"could not fetch {remote.name}: {tried}. Put {remote.name}.gz (or {remote.name}) "
        "in one of the local folders, or check the network and the mirror list"
    )


def _sources(name: str, local_dirs: list[Path], mirrors: list[str]) -> Iterator[Path | str]:
    for folder in local_dirs:
        found = [p for p in (folder / f"{name}.gz", folder / name) if p.is_file()]
        # A folder without the file still yields a path, so it shows up among the failures.
        yield from found or [folder / f"{name}.gz"]
    for mirror in mirrors:
        yield f"{mirror.rstrip('/')}/{name}.gz"


def _install(source: Path | str, remote: RemoteFile, target: Path, timeout_s: float) -> None:
    stream, total = _open(source, timeout_s)
    with stream:
        fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{remote.name}.", suffix=_TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                _copy_verified(stream, out, remote, str(source).endswith(".gz"), total)
            os.replace(temp_name, target)
        except BaseException:  # KeyboardInterrupt too: never leave the temp file behind
            Path(temp_name).unlink(missing_ok=True)
            raise


def _open(source: Path | str, timeout_s: float) -> tuple[BinaryIO, int | None]:
    if isinstance(source, Path):
        return source.open("rb"), source.stat().st_size
    response = urllib.request.urlopen(source, timeout=timeout_s)
    return response, response.length


def _copy_verified(
    stream: BinaryIO, out: BinaryIO, remote: RemoteFile, gzipped: bool, total: int | None
) -> None:
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if gzipped else None  # 16+: gzip header
    digest, received, size = hashlib.sha256(), 0, 0
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=remote.name, leave=False
    ) as bar:
        while chunk := stream.read(_CHUNK):
            bar.update(len(chunk))
            received += len(chunk)
            data = inflate.decompress(chunk) if inflate else chunk
            digest.update(data)
            size += len(data)
            if size > remote.size:  # stop early rather than fill the disk with the wrong thing
                raise _Rejected(f"larger than the expected {remote.size} bytes")
            out.write(data)
    if received == 0:
        raise _Rejected("empty file")
    # http.client returns b"" on a connection closed early instead of raising, so count.
    if total is not None and received < total:
        raise _Rejected(f"transfer ended after {received} of {total} bytes")
    if inflate is not None and not inflate.eof:
        raise EOFError
    if size != remote.size or digest.hexdigest() != remote.sha256:
        raise _Rejected(
            f"checksum mismatch: got sha256 {digest.hexdigest()[:16]}... ({size} bytes), "
            f"expected {remote.sha256[:16]}... ({remote.size} bytes)"
        )


def _is_valid(path: Path, remote: RemoteFile) -> bool:
    if not path.is_file() or path.stat().st_size != remote.size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == remote.sha256


def _reason(error: BaseException) -> str:
    """A short, one-line reason a source failed."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        if not isinstance(error.reason, BaseException):
            return " ".join(str(error.reason).split())
        error = error.reason
    if isinstance(error, EOFError):
        text = "truncated gzip (stream ends early)"
    elif isinstance(error, zlib.error):
        text = f"corrupt gzip ({error})"
    elif isinstance(error, TimeoutError):
        text = "timed out"
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())
