"""The project's own exception types.

Every failure a user can cause (bad config, bad file, bad checkpoint) is raised as a subclass of
:class:`EkdError` with a message naming the file, key or shape involved, so the CLI can print it
without a traceback.
"""


class EkdError(Exception):
    """Base class of all errors raised deliberately by ekd."""


class ConfigError(EkdError, ValueError):
    """A configuration key, type or value is invalid."""


class DataError(EkdError, ValueError):
    """A dataset, pair list or data file is missing, empty or malformed."""


class CheckpointError(EkdError, ValueError):
    """A checkpoint or teacher file is missing, corrupt or does not match the model."""


def user_message(exc: EkdError) -> str:
    """The message to show for ``exc``. An error raised in a DataLoader worker reaches the main
    process re-created by torch with the worker's whole traceback as its message; only the
    original message is kept (and which worker raised it)."""
    text = str(exc)
    head, sep, trace = text.partition("\nOriginal Traceback (most recent call last):")
    if not sep:
        return text
    last = trace.rstrip().rsplit("\n", 1)[-1]
    original = last.split(": ", 1)[1] if last.startswith(f"ekd.errors.{type(exc).__name__}: ") else last
    where = head.split(" in ", 1)[1].rstrip(".") if " in " in head else "a DataLoader worker"
    return f"{original} (in {where})"
