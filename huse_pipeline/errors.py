"""User-facing errors. The library raises `HuseError` with a message that says what went wrong
and what to do; the CLI turns it into a one-line `click.ClickException` instead of a traceback."""


class HuseError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""
