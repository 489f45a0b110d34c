"""The one contract every backend honours: run a named graph on numpy feeds, get numpy outputs."""
from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """Runs the bundle's three graphs ("image_encoder", "text_encoder", "scorer").

    Feeds and outputs follow :mod:`mssan_infer.spec`: inputs are float32/int64
    arrays keyed by the spec's input names; outputs are float32 arrays keyed by
    the spec's output names, whatever precision the backend computes in.
    ``run`` must be safe to call from several threads at once.
    """

    name: str

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``graph`` on ``feeds``; returns every output of the graph by name.

        Raises:
            InputError: unknown graph name or feeds that do not match its inputs.
        """
        ...

    def close(self) -> None:
        """Release sessions/engines/connections. Idempotent."""
        ...
