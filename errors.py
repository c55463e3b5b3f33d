"""Errors that mean "the user's config or data is wrong", shared by every package.

The CLI reports them in one line, without a traceback.
"""


class InputError(ValueError):
    """Base of the errors a user fixes in their config or data; the message says what and how."""


class ConfigError(InputError):
    """A config value that cannot work (names the key and the fix)."""


class DataError(InputError):
    """Data that cannot be used as given (names the file, row or id)."""
