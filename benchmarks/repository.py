"""The benchmarks' fresh copies of this repository, so a run never touches the working tree's outputs."""

import os
import subprocess
import sys
import time
from collections.abc import Callable
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


def command_timer(repo: Path) -> Callable[..., float]:
    """A function that runs a command in `repo`, with this interpreter's environment first on PATH (as `make`
    puts it), and returns its wall time in seconds; a command that fails raises with its output captured."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def run(*args: str) -> float:
        started = time.perf_counter()
        subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True)
        return time.perf_counter() - started

    return run


def init_repository(run: Callable[..., float], commit: bool = False) -> None:
    """Make the copy a git and DVC repository with `run` (a command_timer), and commit its files when asked
    (`dvc exp run` needs a commit to start from)."""
    run("git", "init", "-q")
    run("dvc", "init", "-q", "-f")
    if commit:
        run("git", "add", "-A")
        run("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench")
