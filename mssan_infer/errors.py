"""Typed errors of the MSSAN runtime (defined in :mod:`mssan_infer.core.errors`, re-exported here)."""
from __future__ import annotations

from .core.errors import (
    BackendUnavailableError,
    BundleError,
    IndexFileError,
    IndexWriteError,
    InputError,
    MssanError,
    ParityError,
)

__all__ = [
    "MssanError",
    "BundleError",
    "IndexFileError",
    "IndexWriteError",
    "InputError",
    "BackendUnavailableError",
    "ParityError",
]
