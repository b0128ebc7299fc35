"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """A mistake the user can fix (bad flag, missing file, wrong checkpoint...). The message says how.

    A `ValueError`, so library callers catch it as Python's own "bad argument" (`lm.generate(..., top_k=0)`)."""
