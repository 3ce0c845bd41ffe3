"""Command-line front ends (train, eval, prepare, export, md, spectra, driver) and their one
error path: `run_cli`.

Every tool reports an expected error (`polarmace.errors.InputError`: config, data, model file,
device, output location) as one line ``<prog>: error: <message>`` on stderr and exits with
status 2 (argparse's status for a bad command line); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["run_cli", "EXIT_INPUT_ERROR"]

#: Exit status of an expected (user-fixable) error.
EXIT_INPUT_ERROR = 2


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run `body` (the tool's work, returning its exit status) and turn an InputError into
    one line on stderr and exit status 2."""
    from polarmace.errors import InputError

    try:
        return body()
    except InputError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_INPUT_ERROR
