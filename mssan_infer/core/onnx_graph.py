"""One exported graph on ONNX Runtime's CPU provider, for the models of a Triton repository.

Both Python-backend models run graphs with this: the ``python`` flavour (and the
Python-based ``onnxruntime`` backend that ``python -m mssan_infer serve`` gives
nvidia-pytriton's server) runs one graph per model, and the ``retriever`` model
runs the encoders and the scorer in its own process (``graphs: local``) instead of
calling them through BLS. onnxruntime is imported when a graph is opened, so the
rest of the core stays numpy-only.

Idle ONNX Runtime workers do not spin between runs: several models share the
server's cores, and a worker spinning for one model holds the core the next one
needs (the same default as ``mssan_infer``'s ONNX Runtime backend).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .errors import BackendUnavailableError

__all__ = ["OnnxGraph", "import_onnxruntime"]

_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16,
          "tensor(int32)": np.int32, "tensor(double)": np.float64}


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module. Raises BackendUnavailableError saying what to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(
            f"running graphs in the Python backend needs onnxruntime in the server's Python: `pip install onnxruntime` "
            f"({e})"
        ) from e
    return onnxruntime


class OnnxGraph:
    """An ONNX Runtime session on one ``.onnx`` file (CPU provider).

    Args:
        path: the graph.
        threads: intra-op threads (``0``: ONNX Runtime's default, one per core).
        spinning: let idle workers spin-wait after a run (off by default, see the module doc).
    """

    def __init__(self, path: str, *, threads: int = 0, spinning: bool = False) -> None:
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads > 0:
            opts.intra_op_num_threads = int(threads)
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: np.dtype(_TYPES.get(i.type, np.float32)) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run on ``feeds`` (cast to the graph's input dtypes) -> ``{output name: array}``."""
        names = outputs or self.outputs
        cast = {n: np.ascontiguousarray(feeds[n], dtype=t) for n, t in self.inputs.items()}
        return dict(zip(names, self.session.run(names, cast)))
