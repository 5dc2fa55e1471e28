"""User-facing errors.

A `PapoError` is a mistake the user can fix (bad config, wrong world size, busy port). The CLI
prints its message as one line and exits non-zero; it never shows a traceback for these. Each
message names the problem and the fix.
"""


class PapoError(Exception):
    """A user mistake with a one-line message that says what is wrong and how to fix it."""


class ConfigError(PapoError):
    """Unknown key, wrong type or impossible combination in a config."""


class LayoutError(PapoError):
    """A parallel layout that does not fit the world size or the model."""


class LaunchError(PapoError):
    """A launcher environment that is incomplete or inconsistent, or a port in use."""
