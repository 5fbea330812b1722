"""Safe extraction of a data set's tar archive: only the members its format names, as regular files of bounded
size, into a temporary folder that replaces the old one only once every member is out.

A checksum says the archive is the one that was pinned, not that it is harmless: a pin can be wrong (a
user's own data set) or a publisher compromised, so each member is checked before a byte of it is written.
"""

import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from image_classifier.errors import one_line


class ArchiveError(Exception):
    """The archive is damaged or holds something it must not; the message says which member and why."""


def safe_extract(
    archive: Path, dest: Path, allowed: Mapping[str, int], required: Sequence[str], scratch: str = ".extract."
) -> list[Path]:
    """Extract `archive` (tar, optionally gzipped) into `dest`, replacing the folder(s) it extracts to.

    `allowed` maps every member path the archive may hold to its largest size in bytes; `required` lists those
    it must hold. Directory entries are skipped (folders are made as needed). Scratch space is a folder in
    `dest` whose name starts with `scratch` and ends with ".part", removed on return. Raises ArchiveError, leaving
    `dest` as it was, for a member not in `allowed`, not a regular file, too large, listed twice, or missing,
    and for a damaged archive. Returns the extracted paths in archive order.
    """
    dest = Path(dest)
    tops = {PurePosixPath(name).parts[0] for name in allowed}
    temp = Path(tempfile.mkdtemp(dir=dest, prefix=scratch, suffix=".part"))
    try:
        names = _extract_checked(archive, temp, allowed, tops)
        missing = [name for name in required if name not in names]
        if missing:
            raise ArchiveError(f"member {missing[0]!r} is missing")
        for top in sorted(tops):
            if (temp / top).exists():
                # The old folder goes into `temp`, deleted below with it: an interruption between the two
                # renames leaves no folder (the next run extracts again), never a mix of old and new.
                if (dest / top).exists():
                    (dest / top).rename(temp / f".old-{top}")
                (temp / top).rename(dest / top)
        return [dest / name for name in names]
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _extract_checked(archive: Path, temp: Path, allowed: Mapping[str, int], tops: set[str]) -> list[str]:
    names: list[str] = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:  # one pass over the (decompressed) stream, checking before writing
                name = _check(member, allowed, tops, names)
                if name is None:
                    continue
                # filter="data" repeats the checks above in the standard library's own words (defence in depth)
                # and drops permission bits and owners the archive asks for.
                tar.extract(member, temp, filter="data")
                names.append(name)
    except (tarfile.TarError, EOFError, zlib.error) as error:
        reason = "truncated: it ends early" if isinstance(error, EOFError) else one_line(error)
        raise ArchiveError(f"damaged archive ({reason})") from None
    except OSError as error:  # gzip.BadGzipFile, or a write failing (disk full)
        raise ArchiveError(f"damaged archive or unwritable folder ({one_line(error)})") from None
    return names


def _check(
    member: tarfile.TarInfo, allowed: Mapping[str, int], tops: set[str], seen: list[str]
) -> str | None:
    """The member's path if it is to be extracted, None for a directory entry to skip; ArchiveError if bad."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise ArchiveError(f"member {member.name!r} points outside the extraction folder")
    name = str(path)  # drops "./" and a trailing "/"
    if member.isdir() and name in tops:
        return None
    if name not in allowed:
        raise ArchiveError(f"unexpected member {member.name!r}")
    if not member.isreg():
        kind = "a symlink" if member.issym() else "a hard link" if member.islnk() else "not a regular file"
        raise ArchiveError(f"member {member.name!r} is {kind}")
    if member.size > allowed[name]:
        raise ArchiveError(
            f"member {member.name!r} is {member.size} bytes, more than the {allowed[name]} allowed"
        )
    if name in seen:
        raise ArchiveError(f"member {member.name!r} appears twice")
    return name
