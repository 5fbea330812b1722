"""Errors a user can fix: stages print them as one line and exit with status 2."""

import gc
import re
import signal
import sys
from collections.abc import Callable
from types import FrameType


class UserError(Exception):
    """A problem with the user's input (params, data, files): shown as one line, exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, what `kill`, SLURM and Kubernetes send before they kill. A KeyboardInterrupt, so it unwinds
    exactly like Ctrl-C: the MLflow run ends KILLED, the resume checkpoint stays."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM must not cut short the clean-up of the first (ending the run, writing its last
    # metrics); SLURM and Kubernetes follow up with SIGKILL if the clean-up takes too long.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def run_cli(main: Callable[[], None]) -> None:
    """Run a stage or command's `main`, turning a UserError into one line on stderr and exit status 2, Ctrl-C
    into "interrupted" and 130, SIGTERM into "terminated" and 143 (128 + the signal, as the shell reports).

    On the way out the garbage collector's objects are frozen: the interpreter's last collections walk every
    object torch, MLflow and torch's compiler front end created, 0.85 s of each stage's exit (2-core AMD EPYC);
    memory is freed with the process all the same, and files, atexit handlers and finalizers run as before."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except UserError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        gc.freeze()


def one_line(error: BaseException, limit: int | None = 160) -> str:
    """An error's message as one line of at most `limit` characters (None: all of it), or its type's name when
    it has none: the cause a one-line message gives in parentheses."""
    return " ".join(str(error).split())[:limit] or type(error).__name__


def load_failure(error: BaseException) -> str:
    """Why `torch.load(weights_only=True)` refused a file, in a few words. PyTorch's own message runs to several
    paragraphs and suggests turning the safety check off, which is the one thing not to do with a stranger's file."""
    text = str(error)
    if "Weights only load failed" in text:
        code = re.search(r"GLOBAL (\S+)", text)
        if code:
            return f"it holds Python code or objects, not plain tensors ({code[1]}); refusing to unpickle it"
        return "not a file torch.save wrote (or damaged)"
    if "PytorchStreamReader" in text or isinstance(error, EOFError):
        return "truncated or damaged (not a complete torch.save file)"
    return f"{type(error).__name__}: {one_line(error)}"


def warn_each(header: str, lines: list[str], limit: int, more: str = "") -> None:
    """`header`, then the first `limit` of `lines` on stderr, then how many more (and `more`, where they are)."""
    print(header, file=sys.stderr)
    for line in lines[:limit]:
        print(f"  {line}", file=sys.stderr)
    if len(lines) > limit:
        print(f"  ... and {len(lines) - limit} more{more}", file=sys.stderr)
