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
