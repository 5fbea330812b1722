"""Put a data set's files, decompressed and checksum-verified, into a folder; extract its archive, if any.

Local copies are tried before mirrors, so a machine with the files installed never needs the network.
A file only ever appears under its final name once its checksum matched (and, for an archive, once it was
extracted safely): it is written to a dot-file beside it and renamed, so an interrupted run leaves at worst a
stale dot-file, removed by the next run.

Checksums: a sha256 of the stored (decompressed) bytes is checked while downloading and again on every run.
A publisher's md5 of the file as served is checked while downloading; a file stored as served (an archive)
is checked again on every run, but a decompressed one cannot be, so it is fetched again each time (under
`dvc repro` data/raw starts empty anyway, and DVC's own hash of data/raw guards it afterwards).
"""

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from image_classifier import archive
from image_classifier.datasets import CIFAR_MEMBERS, CIFAR_REQUIRED, DatasetSpec, RemoteFile
from image_classifier.errors import UserError, one_line
from image_classifier.files import file_digest

_CHUNK = 1 << 20
_TEMP_SUFFIX = ".part"
# What a bad source can throw at us; anything else is a bug and should not be reported as "source failed".
_SOURCE_ERRORS = (OSError, EOFError, ValueError, zlib.error, http.client.HTTPException)


class _Rejected(Exception):
    """The bytes arrived but are not the file we want."""


def local_folders(templates: Sequence[str], dataset: str) -> list[Path]:
    """`fetch.local_dirs` for data set `dataset`: `{dataset}` in each folder replaced by its name, so
    /usr/share/datasets/{dataset} finds Debian's /usr/share/datasets/fashion-mnist and nothing of it for MNIST."""
    return [Path(template.replace("{dataset}", dataset)) for template in templates]


def fetch_dataset(
    spec: DatasetSpec,
    dest: Path,
    local_dirs: Sequence[Path],
    mirrors: Sequence[str],
    timeout_s: float = 30.0,
) -> list[Path]:
    """Make `dest/<name>` exist, decompressed and verified, for every file of `spec`; return those paths.
    An archive (a cifar-binary data set's) stays as served, and its members are extracted beside it.

    Sources are tried in order: each local folder (`<name>.gz` or `<name>`), then each mirror
    (`mirrors`, or `spec.mirrors` when empty). Raises UserError if a file could not be had from any.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    mirrors = list(mirrors) or list(spec.mirrors)
    paths = []
    for role, remote in spec.files.items():
        target = dest / remote.name
        for stale in dest.glob(f".{remote.name}.*{_TEMP_SUFFIX}"):
            if stale.is_dir():  # an interrupted extraction
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        unpack = _extractor(dest, remote.name) if role == "archive" else None
        # Re-hashing (rather than trusting existence) also catches a file damaged after a crash.
        if not _is_valid(target, remote):
            _fetch_file(remote, target, [Path(d) for d in local_dirs], mirrors, timeout_s, unpack)
        elif unpack is not None:
            # Extracting again (seconds) rather than trusting the folder: its members carry no checksum.
            try:
                unpack(target)
            except _Rejected as error:
                raise UserError(f"cannot extract {target}: {error}; delete it and fetch again") from None
        paths.append(target)
    return paths


def _extractor(dest: Path, name: str) -> Callable[[Path], None]:
    """Extract a verified cifar-binary archive into `dest`; _Rejected (naming the member) if it is unsafe."""

    def unpack(path: Path) -> None:
        try:
            # Scratch named like the archive's temp files, so the stale-file sweep above finds it too.
            extracted = archive.safe_extract(path, dest, CIFAR_MEMBERS, CIFAR_REQUIRED, scratch=f".{name}.")
        except archive.ArchiveError as error:
            raise _Rejected(str(error)) from None
        print(f"extracted {len(extracted)} files into {dest}")

    return unpack


def _fetch_file(
    remote: RemoteFile,
    target: Path,
    local_dirs: list[Path],
    mirrors: list[str],
    timeout_s: float,
    unpack: Callable[[Path], None] | None,
) -> None:
    failures, rejections = [], []
    for source in _sources(remote, local_dirs, mirrors):
        try:
            _install(source, remote, target, timeout_s, unpack)
        except (*_SOURCE_ERRORS, _Rejected) as error:
            failures.append(f"{source}: {_source_failure(error)}")
            # A missing local copy is the normal case on a machine with network: not worth a line.
            if not isinstance(error, FileNotFoundError):
                rejections.append(f"{remote.name}: rejected {source}: {_source_failure(error)}")
        else:
            # Worth knowing when a later source saved the day; when none does, the error lists them all.
            for rejection in rejections:
                print(rejection, file=sys.stderr)
            print(f"{remote.name}: verified, from {source}")
            return
    tried = "; ".join(failures) or "no local folders or mirrors to try"
    served = _served_names(remote)
    put = served[0] + (f" (or {served[1]})" if len(served) > 1 else "")
    raise UserError(
        f"could not fetch {remote.name}: {tried}. Put {put} "
        "in one of the local folders, or check the network and the mirror list"
    )


def _served_names(remote: RemoteFile) -> list[str]:
    """The names a source may hold the file under, best first."""
    if not remote.gzipped:
        return [remote.name]
    if not remote.sha256:  # only the .gz's md5 is known: a decompressed copy could not be verified
        return [f"{remote.name}.gz"]
    return [f"{remote.name}.gz", remote.name]


def _sources(remote: RemoteFile, local_dirs: list[Path], mirrors: list[str]) -> Iterator[Path | str]:
    served = _served_names(remote)
    for folder in local_dirs:
        found = [folder / name for name in served if (folder / name).is_file()]
        # A folder without the file still yields a path, so it shows up among the failures.
        yield from found or [folder / served[0]]
    for mirror in mirrors:
        yield f"{mirror.rstrip('/')}/{served[0]}"


def _install(
    source: Path | str,
    remote: RemoteFile,
    target: Path,
    timeout_s: float,
    unpack: Callable[[Path], None] | None,
) -> None:
    stream, total = _open(source, timeout_s)
    with stream:
        fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{remote.name}.", suffix=_TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                _copy_verified(stream, out, remote, remote.gzipped and str(source).endswith(".gz"), total)
            if unpack is not None:  # an archive takes its final name only once it proved extractable
                unpack(Path(temp_name))
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
    # sha256 of what is stored when pinned; otherwise the publisher's md5 of what is served.
    digest = hashlib.sha256() if remote.sha256 else hashlib.md5(usedforsecurity=False)
    received, size = 0, 0
    with tqdm(  # live on a terminal only (disable=None): a log gets the summary line instead
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=remote.name, leave=False, disable=None
    ) as bar:
        while chunk := stream.read(_CHUNK):
            bar.update(len(chunk))
            received += len(chunk)
            data = inflate.decompress(chunk) if inflate else chunk
            digest.update(data if remote.sha256 else chunk)
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
    expected = remote.sha256 or remote.md5
    if size != remote.size or digest.hexdigest() != expected:
        raise _Rejected(
            f"checksum mismatch: got {digest.name} {digest.hexdigest()[:16]}... ({size} bytes), "
            f"expected {expected[:16]}... ({remote.size} bytes)"
        )


def _is_valid(path: Path, remote: RemoteFile) -> bool:
    """Whether `path` is already the verified file. Never for a file pinned only by the md5 of its .gz."""
    if not remote.sha256 and remote.gzipped:
        return False
    if not path.is_file() or path.stat().st_size != remote.size:
        return False
    return file_digest(path, "sha256" if remote.sha256 else "md5") == (remote.sha256 or remote.md5)


def _source_failure(error: BaseException) -> str:
    """Why a source failed, in one line: what went wrong with the download or the file, in a few words."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        if not isinstance(error.reason, BaseException):
            return " ".join(str(error.reason).split())
        error = error.reason
    if isinstance(error, EOFError):
        return "truncated gzip (stream ends early)"
    if isinstance(error, zlib.error):
        return f"corrupt gzip ({one_line(error, limit=None)})"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return " ".join(error.strerror.split())
    return one_line(error, limit=None)
