"""The one way the runtime imports an optional package: when first needed, with a typed error saying what to
install."""

from __future__ import annotations

import importlib
from typing import Any

from mssan_infer.errors import BackendUnavailableError

__all__ = ["optional_import"]


def optional_import(module: str, install: str, needed_for: str, instead: str = "") -> Any:
    """Import ``module`` (e.g. ``"faiss"``, ``"tritonclient.grpc"``).

    Args:
        module: the module to import.
        install: what to install, as a pip argument (``"faiss-cpu"``, ``"'tritonclient[grpc]'"``).
        needed_for: what needs it, for the message (``"stage-1 search with FAISS"``).
        instead: what to use without it (``"stage1='numpy'"``), if anything.
    Raises:
        BackendUnavailableError: the import failed; the message names the package and the alternative.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        alt = f", or use {instead}" if instead else ""
        raise BackendUnavailableError(
            f"{needed_for} needs {module.split('.')[0]}: `pip install {install}`{alt} (import of {module} "
            f"failed: {e})"
        ) from e
