"""Errors a user can fix: stages print them as one line and exit with status 2."""

import re
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (params, data, files): shown as one line, exit status 2."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a stage or command's `main`, turning a UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


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
    return f"{type(error).__name__}: {' '.join(text.split())[:160]}"
