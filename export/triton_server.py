"""Moved to :mod:`mssan_infer.serve` (the runtime's ``python -m mssan_infer serve`` needs it without the exporter)."""
from __future__ import annotations

from mssan_infer.serve import (  # noqa: F401  (re-exported for existing imports)
    RunningServer,
    TritonBinary,
    find_tritonserver,
    free_port,
    local_tritonserver,
    server_env,
)

__all__ = ["TritonBinary", "RunningServer", "find_tritonserver", "free_port", "local_tritonserver", "server_env"]
