"""User-facing errors.

Every error a user can cause (bad file, unknown option, wrong model...) is a :class:`SensitivityError`.
The CLI prints its message as one line and exits with status 2; Python callers can catch it.
"""


class SensitivityError(Exception):
    """Base class for errors caused by user input. The message is one line naming the culprit."""


class UnknownOptionError(SensitivityError, ValueError):
    """A quantization option name that is not in the registry."""


class MultiquantizerMismatchError(SensitivityError):
    """A multiquantizer file that does not belong to the given model."""


class CorruptFileError(SensitivityError):
    """A truncated, tampered or unreadable file."""


class ConfigError(SensitivityError, ValueError):
    """A quantization config that does not fit the model or multiquantizer."""
