"""Errors that mean "bad input": the CLI turns them into one line on stderr and exit code 2."""


class InputError(ValueError):
    """Bad usage or bad input: a missing file, a corrupt checkpoint, an unknown dataset, an out-of-range value."""
