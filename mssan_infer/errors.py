"""Typed errors of the MSSAN runtime.

Every error a user can cause is an ``MssanError``: its message says what was
wrong, what was expected and what to do.
"""

from __future__ import annotations

__all__ = [
    "MssanError",
    "BundleError",
    "IndexFileError",
    "IndexWriteError",
    "InputError",
    "BackendUnavailableError",
    "ParityError",
]


class MssanError(Exception):
    """Base class of every error raised on purpose by mssan."""


class BundleError(MssanError):
    """A bundle (or checkpoint) folder is missing, tampered, truncated or of an unknown format."""


class IndexFileError(MssanError):
    """A saved index is missing, damaged, or was built with another bundle."""


class IndexWriteError(IndexFileError, OSError):
    """An index could not be written (disk full, no permission, a bad path); the previous index is
    unchanged."""


class InputError(MssanError, ValueError):
    """An argument has the wrong shape, dtype, value or content."""


class BackendUnavailableError(MssanError, ImportError):
    """An optional backend package (tensorrt, tritonclient, faiss...) is missing or unusable."""


class ParityError(MssanError):
    """Exported graphs disagree with the PyTorch model beyond tolerance."""
