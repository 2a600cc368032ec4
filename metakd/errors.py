"""Errors that the command line reports as ``error: ...`` (exit code 2) rather than a traceback."""


class DataError(ValueError):
    """The data cannot be used as configured; the message names the field or file and what was expected."""
