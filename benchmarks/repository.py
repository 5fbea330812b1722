"""The benchmarks' fresh copies of this repository, so a run never touches the working tree's outputs."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def copy_repository(repo: Path) -> Path:
    """The project's tracked files in a fresh folder (not yet a git or DVC repository)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in files.stdout.split():
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_bytes((REPO / name).read_bytes())
    return repo
