"""Errors that mean "the input is wrong and the message says how to fix it".

`run_and_exit_on_failure` (and the data_prep CLI) print these as one line without a traceback:
the traceback would only point at the code that noticed the problem, not at the problem.
`DWNET_DEBUG=1` prints the traceback too.
"""
from __future__ import annotations

import os


class UserError(Exception):
    """Bad input (config, data, environment); the message is one line naming the thing and the fix."""


class DataError(UserError):
    """A data file or image that cannot be read as configured (names the file and the fix)."""


def debug_tracebacks() -> bool:
    """True when DWNET_DEBUG asks for tracebacks of one-line errors too."""
    return os.environ.get("DWNET_DEBUG", "") not in ("", "0")
