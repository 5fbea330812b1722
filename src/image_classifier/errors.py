"""Errors a user can fix: stages print them as one line and exit with status 2."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (params, data, files): shown as one line, exit status 2."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a stage or command's `main`, turning a UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
