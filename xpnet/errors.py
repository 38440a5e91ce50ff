"""xpnet's exception types: one policy for the library and the command line.

Every error xpnet raises on purpose is an ``XpnetError`` carrying one sentence
that names the file, layer or option at fault and the fix.  Each type also
derives from the matching built-in (``ValueError``, ``OSError``,
``RuntimeError``) so that ordinary ``except ValueError`` code keeps working.

The command line maps them to exit codes: ``UsageError`` (and its subclasses)
exit 2, every other ``XpnetError`` exits 1.
"""


class XpnetError(Exception):
    """Base of every error xpnet raises on purpose."""

    exit_code = 1


class UsageError(XpnetError, ValueError):
    """A bad argument, option or environment variable (CLI exit code 2)."""

    exit_code = 2


class BackendError(XpnetError, RuntimeError):
    """The backend asked for cannot be used (CuPy missing, no device, ...)."""


class BackendUsageError(UsageError):
    """An unknown backend name or dtype (a usage error, CLI exit code 2)."""


class DeviceMismatchError(XpnetError, ValueError):
    """Arrays of two backends (NumPy and CuPy) were mixed in one call."""


class ShapeError(XpnetError, ValueError):
    """An array has a shape or dtype that the layer or op cannot take."""


class DataError(XpnetError, ValueError):
    """An image, label or data folder cannot be used."""


class ModelFileError(XpnetError, ValueError):
    """A model or checkpoint file is missing, damaged, foreign or unsafe."""


class TrainingError(XpnetError, RuntimeError):
    """Training cannot go on (a NaN loss, a diverging run, ...)."""


class StorageError(XpnetError, OSError):
    """A file or folder cannot be written (permissions, full disk, ...)."""
