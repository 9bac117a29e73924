"""The base of montrage's own errors.

A `MontrageError` is bad input or configuration: its message names the file, field and fix, and the command line
prints it as one line (exit status 2). Anything else is a bug and keeps its traceback. Each domain error also
derives from the builtin it refines (mostly ValueError), so `except ValueError` keeps working."""


class MontrageError(Exception):
    """Bad input or configuration, said in one line that names the file, field and fix."""
