"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong checkpoint...). The message says how."""
