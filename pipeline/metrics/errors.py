"""The one error type of the evaluation code: bad input that the user can fix."""


class EvalError(ValueError):
    """A bad argument, file or checkpoint; the message names the argument and the fix (gan-eval exits 2)."""
