"""Typed errors of the exporter (all ``MssanError``s, so the CLI reports them in one line); a parity failure
is ``mssan_infer.errors.ParityError``."""

from __future__ import annotations

from mssan_infer.errors import MssanError

__all__ = ["ExportError"]


class ExportError(MssanError):
    """The export cannot proceed: bad arguments, an output folder that must not be replaced, an invalid
    graph."""
