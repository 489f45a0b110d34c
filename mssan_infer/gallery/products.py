"""Products of gallery rows with a query, read where the rows lie: ``rows[i] @ q`` for many small rows.

The exact path's gather multiplies each of its candidates' float32 locals ``[P, D]`` (in RAM or
memory-mapped) by the query's ``[D, Q]``. One numpy (OpenBLAS) call per row runs these thin products
well below the CPU's float32 peak; ONNX Runtime's MLAS GEMM runs them faster, but one
``InferenceSession.run`` per row costs more than the product. :class:`RowProducts` therefore runs
:data:`ROWS_PER_RUN` rows per call: a graph of that many ``MatMul`` nodes, each fed one row as it lies
(no copy of the rows), on the calling thread (docs/experiments/2026-12-08-exact-scan-and-products.md).

The graph is written here as ONNX protobuf bytes (the runtime does not depend on the ``onnx`` package).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from mssan_infer.deps import optional_import

__all__ = ["ROWS_PER_RUN", "RowProducts", "matmuls_model"]

ROWS_PER_RUN = 16  # MatMul nodes in the graph: rows per InferenceSession.run
_OPSET = 17
_IR_VERSION = 8
_FLOAT = 1  # TensorProto.FLOAT


# ---- a few protobuf fields (https://protobuf.dev/programming-guides/encoding/) ---------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:  # wire type 0
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:  # wire type 2: strings and messages
    raw = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def _float_tensor(name: str, dims: Sequence[str]) -> bytes:
    """ValueInfoProto ``name``: a float tensor with symbolic dims."""
    shape = b"".join(_bytes(1, _bytes(2, d)) for d in dims)  # TensorShapeProto.dim(Dimension.dim_param)
    tensor = _int(1, _FLOAT) + _bytes(2, shape)  # TypeProto.Tensor: elem_type, shape
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor))  # name, type(TypeProto.tensor_type)


def matmuls_model(n: int) -> bytes:
    """ONNX ``ModelProto`` bytes: inputs ``a0..a{n-1}`` ``[P_i, D]`` and ``q`` ``[D, Q]``, outputs
    ``c_i = MatMul(a_i, q)`` ``[P_i, Q]`` (opset 17, float32)."""
    # NodeProto(input, input, output, op_type), each a GraphProto.node
    nodes = (_bytes(1, f"a{i}") + _bytes(1, "q") + _bytes(2, f"c{i}") + _bytes(4, "MatMul") for i in range(n))
    graph = b"".join(_bytes(1, node) for node in nodes)
    graph += _bytes(2, "row_products")
    graph += b"".join(_bytes(11, _float_tensor(f"a{i}", (f"P{i}", "D"))) for i in range(n))
    graph += _bytes(11, _float_tensor("q", ("D", "Q")))
    graph += b"".join(_bytes(12, _float_tensor(f"c{i}", (f"P{i}", "Q"))) for i in range(n))
    opset = _bytes(1, "") + _int(2, _OPSET)  # OperatorSetIdProto(domain, version)
    return _int(1, _IR_VERSION) + _bytes(2, "mssan_infer") + _bytes(7, graph) + _bytes(8, opset)


class RowProducts:
    """``out[i] = rows[i] @ q`` over float32 rows, :data:`ROWS_PER_RUN` rows per ONNX Runtime run, each run
    on the calling thread (threads may call at once). Made once per process (:meth:`get`)."""

    _made: RowProducts | None = None
    _lock = threading.Lock()

    def __init__(self, per_run: int = ROWS_PER_RUN) -> None:
        # the gallery does not import the backends (their session factory is for bundle graphs)
        ort = optional_import("onnxruntime", "onnxruntime", "the exact path's candidate products")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # the caller's thread: the gather already runs a part per core
        opts.log_severity_level = 3
        self.per_run = int(per_run)
        self._session = ort.InferenceSession(
            matmuls_model(self.per_run), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._inputs = [f"a{i}" for i in range(self.per_run)]

    @classmethod
    def get(cls) -> RowProducts:
        with cls._lock:
            if cls._made is None:
                cls._made = RowProducts()
            return cls._made

    def run(self, rows: Sequence[np.ndarray], q: np.ndarray, out: Sequence[np.ndarray]) -> None:
        """``out[i][...] = rows[i] @ q``: ``rows[i]`` ``[P_i, D]`` float32 C-contiguous (read in place),
        ``q`` ``[D, Q]`` float32, ``out[i]`` ``[P_i, Q]``."""
        none = np.empty((0, q.shape[0]), np.float32)  # a row of no positions: a short run's unused inputs
        n = self.per_run
        for a in range(0, len(rows), n):
            chunk = rows[a : a + n]
            feed: dict[str, Any] = dict(zip(self._inputs, chunk))
            for name in self._inputs[len(chunk) :]:
                feed[name] = none
            feed["q"] = q
            got = self._session.run(None, feed)
            for dst, src in zip(out[a : a + n], got):
                dst[...] = src
