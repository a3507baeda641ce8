"""What the command-line tools share."""

from __future__ import annotations

import sys

__all__ = ["print_error"]


def print_error(prog: str, error: BaseException) -> int:
    """Print ``<prog>: error: <message>`` on stderr (a KeyError's message without the quotes repr adds) and return
    the exit status 1."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1
