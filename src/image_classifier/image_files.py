"""What `predict` classifies: the files, folders and glob patterns on its command line as one sorted list.

A folder is searched recursively for image files (by suffix, as a folder data set is); a file named on the command
line is taken whatever its suffix, since the user asked for it; a pattern is expanded by Python, so quoting it
(`predict 'scans/**/*.png'`) works the same in every shell. The order is stable: each argument's files sorted by
path, arguments in the order given, a file found twice kept once.
"""

import glob
from pathlib import Path

from image_classifier.errors import UserError
from image_classifier.folder import IMAGE_SUFFIXES

GLOB_CHARACTERS = frozenset("*?[")


def find_inputs(arguments: list[str]) -> list[Path]:
    """Every image the arguments name, in a stable order. A path that does not exist, a pattern that matches
    nothing and a folder without images are mistakes in the command line: UserError (exit 2), not a row."""
    found: dict[Path, None] = {}  # a dict keeps the first-seen order and drops repeats
    for argument in arguments:
        for path in _expand(argument):
            found.setdefault(path, None)
    return list(found)


def _expand(argument: str) -> list[Path]:
    path = Path(argument)
    if path.is_dir():
        images = _images_under(path)
        if not images:
            raise UserError(f"{argument}: no image files in this folder ({_suffixes()})")
        return images
    if (
        path.exists() or path.is_symlink()
    ):  # a dangling link is the user's file too: its row says why it fails
        return [path]
    if GLOB_CHARACTERS & set(argument):
        matches = sorted(glob.glob(argument, recursive=True))
        files = [Path(match) for match in matches if not Path(match).is_dir()]
        folders = [Path(match) for match in matches if Path(match).is_dir()]
        files += [image for folder in folders for image in _images_under(folder)]
        if not files:
            raise UserError(f"{argument}: no files match this pattern")
        return sorted(files)
    raise UserError(f"{argument}: no such file or folder")


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere under `folder`, sorted by path; hidden files and folders skipped (.git, .DS_Store)."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and not path.is_dir()
    )


def _suffixes() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))
