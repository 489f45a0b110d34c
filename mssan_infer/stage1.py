"""The exact stage-1 product ``scores = queries @ base.T`` in ONNX Runtime.

numpy's OpenBLAS leaves its worker threads spin-waiting after each call; in a
query that runs ORT sessions right after stage 1 (the scorer, the next query's
encoder), those spinning workers hold the cores the sessions need. Running the
product in an ORT session with the backend's thread settings keeps one kind of
thread pool in the query path (text->image over 5K images: about 0.7-1 ms less
per query on 2 cores). The result is the same inner product (float32, summation
order aside); top-k selection stays in numpy.

The one-node graph (``MatMul(base [N, D], q [D, Q])``) is encoded here with a
few lines of protobuf wire format, so the runtime needs no ``onnx`` package;
a test checks the bytes against ``onnx.helper`` and ``onnx.checker``.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["matmul_model_bytes", "OrtInnerProduct", "numpy_inner_product", "STAGE1_PRODUCTS"]

STAGE1_PRODUCTS = ("onnxruntime", "numpy")
_FLOAT = 1          # onnx TensorProto.FLOAT
_IR_VERSION = 7     # ONNX Runtime >= 1.8 reads it
_OPSET = 13


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _int_field(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes_field(field: int, value: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(value)) + value


def _str_field(field: int, value: str) -> bytes:
    return _bytes_field(field, value.encode("utf-8"))


def _value_info(name: str, dims: tuple[str, str]) -> bytes:
    """ValueInfoProto: float tensor of two symbolic dims."""
    shape = b"".join(_bytes_field(1, _str_field(2, d)) for d in dims)       # TensorShapeProto.dim{dim_param}
    tensor = _int_field(1, _FLOAT) + _bytes_field(2, shape)                   # TypeProto.Tensor
    return _str_field(1, name) + _bytes_field(2, _bytes_field(1, tensor))    # name, type{tensor_type}


def matmul_model_bytes() -> bytes:
    """Serialized ModelProto of ``scores [N, Q] = MatMul(base [N, D], q [D, Q])``."""
    node = _str_field(1, "base") + _str_field(1, "q") + _str_field(2, "scores") + _str_field(3, "stage1") \
        + _str_field(4, "MatMul")
    graph = (_bytes_field(1, node) + _str_field(2, "mssan_stage1")
             + _bytes_field(11, _value_info("base", ("N", "D"))) + _bytes_field(11, _value_info("q", ("D", "Q")))
             + _bytes_field(12, _value_info("scores", ("N", "Q"))))
    opset = _str_field(1, "") + _int_field(2, _OPSET)
    return _int_field(1, _IR_VERSION) + _str_field(2, "mssan_infer") + _bytes_field(7, graph) + _bytes_field(8, opset)


def numpy_inner_product(queries: np.ndarray, block: np.ndarray) -> np.ndarray:
    """``queries [Q, D] @ block [n, D].T`` with numpy's BLAS."""
    return queries @ block.T


class OrtInnerProduct:
    """``queries [Q, D] @ block [n, D].T`` in an ONNX Runtime CPU session (made on first use).

    Args:
        threads: intra-op threads (``None``: ORT's default).
        allow_spinning: as the ONNX Runtime backend's option (off by default).
    """

    def __init__(self, threads: int | None = None, allow_spinning: bool = False) -> None:
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise InputError(f"threads must be a positive int or None, got {threads!r}")
        self.threads = threads
        self.allow_spinning = bool(allow_spinning)
        self._session: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                if self.threads is not None:
                    opts.intra_op_num_threads = self.threads
                if not self.allow_spinning:
                    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                opts.log_severity_level = 3
                self._session = ort.InferenceSession(matmul_model_bytes(), sess_options=opts,
                                                     providers=["CPUExecutionProvider"])
            return self._session

    def __call__(self, queries: np.ndarray, block: np.ndarray) -> np.ndarray:
        base = np.ascontiguousarray(block, dtype=np.float32)      # no copy for the gallery's own arrays
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).T)
        out = self._get().run(None, {"base": base, "q": q})[0]  # [n, Q]
        return np.ascontiguousarray(out.T)
