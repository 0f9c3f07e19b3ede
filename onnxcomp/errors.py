"""Errors a user can act on.

Every error raised for bad input is an `InputError`: the CLI prints its message on one line and exits with
status 2. `BudgetExceeded` is not an input problem: the model was produced and measured, but it broke a limit
the user set, so the CLI exits with status 1.
"""


class OnnxcompError(Exception):
    """Base class of the errors onnxcomp raises on purpose."""

    exit_code = 2


class InputError(OnnxcompError):
    """A file, option or data set the user gave cannot be used; the message says what to do."""


class BudgetExceeded(OnnxcompError):
    """The optimized model was measured and broke a budget (accuracy drop, latency ratio)."""

    exit_code = 1


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an exception's message (or of a text), for one-line errors; never raises."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__ if isinstance(error, BaseException) else ""
