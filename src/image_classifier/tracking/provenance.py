"""What traces a run to its code, data and machine: the git commit and uncommitted changes, the md5s DVC records
for the data, and the command that reproduces the run."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from image_classifier.files import file_digest

# Files DVC rewrites while a pipeline runs: their changes say nothing about the code or params of a run.
NOT_SOURCE = ("dvc.lock",)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _source_pathspec() -> list[str]:
    return ["--", ".", *(f":(exclude){name}" for name in NOT_SOURCE)]


def uncommitted_diff() -> str:
    """`git diff HEAD` of tracked files, less the files DVC itself rewrites: what makes a tree dirty."""
    return _git("diff", "HEAD", "--no-color", "--no-ext-diff", *_source_pathspec())


def dvc_md5(path: Path) -> str:
    """The md5 DVC records for a file or a folder in dvc.lock, so a tag points at the exact cached object. A
    folder's is DVC's: the md5 of the JSON list of its files' md5s and paths, sorted by path, plus ".dir"."""
    path = Path(path)
    if not path.is_dir():
        return file_digest(path, "md5")
    files = sorted(file for file in path.rglob("*") if file.is_file())
    entries = [
        {"md5": file_digest(file, "md5"), "relpath": file.relative_to(path).as_posix()} for file in files
    ]
    listing = json.dumps(sorted(entries, key=lambda entry: entry["relpath"]), sort_keys=True)
    return hashlib.md5(listing.encode(), usedforsecurity=False).hexdigest() + ".dir"


def source_tags(data_files: dict[str, Path], device: str) -> dict[str, str]:
    """Tags that trace a run to its code, data and machine, and say how to get its outputs back.

    `git.dirty` ignores dvc.lock, which `dvc repro` rewrites as it goes. `reproduce` for a DVC experiment is
    `dvc exp apply` (the experiment's commit holds its params, code and outputs); for a plain `dvc repro` it
    is a checkout of the commit and `dvc repro` (outputs come back from DVC's run cache where it has them);
    a dirty tree's changes are logged with the run (see `start_run`)."""
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", *_source_pathspec()))
    experiment = os.environ.get("DVC_EXP_NAME")
    checkout = f"git checkout {commit} && " if commit else ""
    reproduce = checkout + (f"dvc exp apply {experiment}" if experiment else "dvc repro")
    tags = {
        "git.commit": commit or "unknown",
        "git.dirty": str(dirty).lower(),
        "device": device,
        "torch.version": torch.__version__,
        "reproduce": reproduce,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    tags.update({f"data.{name}.md5": dvc_md5(path) for name, path in data_files.items()})
    if experiment:
        tags["dvc.experiment"] = experiment
        if os.environ.get("DVC_EXP_BASELINE_REV"):
            tags["dvc.baseline"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags
