"""Errors that mean "bad input": the CLI turns them into one line on stderr and exit code 2."""


class InputError(ValueError):
    """Bad usage or bad input: a missing file, a corrupt checkpoint, an unknown dataset, an out-of-range value."""


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that cleanup runs."""


# Signals received while a command runs. Some libraries (coremltools' converter) catch everything, Ctrl-C
# included, and carry on; the signal is remembered here and raised again before any output is put in place.
_pending: list[type[BaseException]] = []


def signal_received(exc: type[BaseException]) -> None:
    _pending.append(exc)
    raise exc()


def check_interrupt() -> None:
    """Raise the interruption a library may have swallowed, if one came; call before committing an output."""
    if _pending:
        raise _pending[0]()


def clear_pending() -> None:
    """Forget received signals: each command starts and ends with none."""
    _pending.clear()


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the last good checkpoint is kept."""
