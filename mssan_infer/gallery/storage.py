"""Gallery layouts: how a gallery stores its stage-1 vectors and locals (exact or int8).

A *layout* is a pair: the storage of the stage-1 vectors that stage 1 scans, and the storage
of the locals (and Gram matrices) that the scorer reranks.

========================  ==============  =========================  ==========================
layout                    stage-1 scan    locals / Grams             final scores
========================  ==============  =========================  ==========================
``fp32`` (default)        float32 (BLAS)  float32 / float32          the PyTorch ``score``
``int8-stage1``           int8 (FAISS)    float32 / float32          the PyTorch ``score``
``int8``                  int8 (FAISS)    int8 + per-vector scale /  stage-1 exact, ``s_ll`` of
                                          float16 (of the int8)      the dequantized locals
========================  ==============  =========================  ==========================

A compressed (``int8``) stage 1 keeps the float32 stage-1 rows too, in a
memory-mapped file that is read only for candidates: the scan over-fetches by the
compressed scores, the candidates are rescored exactly from the float32 rows, best compressed
score first, and a bound on the quantization error (:func:`Stage1Codec.bound`) certifies that no
item left unrescored could enter the top ``k``: rescoring stops there, else every fetched row is
rescored (and with ``certify`` the search fetches more). Stage 1 therefore returns float32 scores,
and the same rows as the exact scan whenever each of those ranks within the fetched rows by
compressed score (always with ``certify``; items within float32 rounding of the ``k``-th score may be
exchanged, as between any two float32 summation orders).

int8 stage-1 codes are ``round(x_j / sigma_j)`` with one scale per dimension ``sigma_j``
(``max |x_j|`` of the first items added, / 127); the scan is FAISS's
``IndexScalarQuantizer(QT_8bit_direct_signed)`` with the query multiplied by ``sigma``, so the
per-dimension scales cost nothing at search time, on one thread per core
(:func:`~mssan_infer.gallery.stage1.code_searcher`). An item with a component past the scale's
range is an *outlier*: it is kept exact and scored on every query (the scales are refitted
when outliers pass 1/16 of the gallery, and a saved index is encoded on scales fitted on every item).

int8 locals are symmetric per vector (each region's / word's ``D`` values share one scale,
``max |v| / 127``), stored as uint8 codes + 128, and reach the scorer as stored: the ``*_int8`` query
scorers run their big product as an integer GEMM on them. Their Gram matrices are computed from the
dequantized vectors.

The ``fp16`` layout and float16 storage (stage 1 or locals) were removed: they won on no axis
(docs/experiments/2026-12-06-stage1-scan.md). A gallery saved with them is refused on load
(:func:`check_saved_storage`), never converted silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mssan_infer.errors import IndexFileError, InputError
from mssan_infer.gallery.stage1 import import_faiss

__all__ = [
    "Layout",
    "LAYOUTS",
    "STORAGE",
    "parse_layout",
    "Stage1Codec",
    "quantize_vectors",
    "local_dtype",
    "int8_codes_as_stored",
    "LOCAL_DTYPES",
    "dequantize_into",
    "store_locals",
    "REMOVED_STORAGE",
    "check_saved_storage",
]

STORAGE = ("float32", "int8")
LOCAL_DTYPES = {"float32": np.float32, "int8": np.uint8}
# float16 gallery storage (the ``fp16`` layout, float16 locals): removed, refused when a saved gallery has it
REMOVED_STORAGE = "float16"
_F32_EPS = 2.0**-24


@dataclass(frozen=True)
class Layout:
    """Storage of one gallery: ``stage1`` (the scanned vectors) and ``local`` (locals; Grams follow)."""

    stage1: str = "float32"
    local: str = "float32"

    def __post_init__(self) -> None:
        if self.stage1 not in STORAGE or self.local not in STORAGE:
            raise InputError(
                f"layout storage must be one of {STORAGE}, got stage1={self.stage1!r}, local={self.local!r}"
            )

    @property
    def gram(self) -> str:
        """Gram storage: float32 beside float32 locals, float16 beside int8 locals."""
        return "float32" if self.local == "float32" else "float16"

    @property
    def name(self) -> str:
        for name, lay in LAYOUTS.items():
            if lay == self:
                return name
        return f"stage1={self.stage1},local={self.local}"

    @property
    def compressed_stage1(self) -> bool:
        return self.stage1 != "float32"

    @property
    def exact(self) -> bool:
        """Final scores equal the PyTorch model's ``score`` (float32 locals)."""
        return self.local == "float32"

    def record(self) -> dict[str, str]:
        """The manifest record of this layout."""
        return {"name": self.name, "stage1": self.stage1, "local": self.local, "gram": self.gram}


LAYOUTS: dict[str, Layout] = {
    "fp32": Layout("float32", "float32"),
    "int8-stage1": Layout("int8", "float32"),
    "int8": Layout("int8", "int8"),
}


def parse_layout(layout: str | Layout | None, local_dtype: str | None = None) -> Layout:
    """A :class:`Layout` from a name in :data:`LAYOUTS` (default ``"fp32"``); ``local_dtype`` overrides its
    locals.

    Raises:
        InputError: an unknown name or storage.
    """
    if isinstance(layout, Layout):
        lay = layout
    elif layout is None:
        lay = LAYOUTS["fp32"]
    elif isinstance(layout, str) and layout in LAYOUTS:
        lay = LAYOUTS[layout]
    else:
        raise InputError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if local_dtype is not None:
        if local_dtype not in STORAGE:
            raise InputError(f"local_dtype must be one of {STORAGE}, got {local_dtype!r}")
        lay = Layout(lay.stage1, local_dtype)
    return lay


def check_saved_storage(stage1: Any, local: Any, where: str) -> None:
    """Refuse a gallery saved with the removed float16 storage (the ``fp16`` layout, or float16 locals).

    Raises:
        IndexFileError: ``stage1`` or ``local`` is ``"float16"``; the message says how to rebuild it.
    """
    if REMOVED_STORAGE not in (stage1, local):
        return
    if (stage1, local) == (REMOVED_STORAGE, REMOVED_STORAGE):
        what = "the fp16 layout"
    elif (stage1, local) == ("float32", REMOVED_STORAGE):
        what = "float16 locals beside a float32 stage 1 (`--fp16-locals`)"
    else:
        what = f"float16 storage (stage 1 {stage1}, locals {local})"
    raise IndexFileError(
        f"{where} was saved with {what}, which was removed (float16 gallery storage won on no axis): "
        "re-index the features with layout 'int8' (smaller) or 'fp32' (exact): "
        "`python -m mssan_infer index ... --layout int8 --overwrite`, or "
        "GalleryOptions(layout='int8') and Retriever.save"
    )


# ---- locals: int8 with one scale per vector --------------------------------------------
def local_dtype(storage: str) -> np.dtype[Any]:
    """The numpy dtype a locals storage keeps its values in (int8 codes are stored as uint8, + 128)."""
    return np.dtype(LOCAL_DTYPES[storage])


def quantize_vectors(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of ``x [..., D]`` with one float32 scale per vector (``max |v| / 127``).

    Returns ``(codes [..., D] uint8, scale [...] float32)``: the codes are stored offset by 128 (the FAISS
    convention), the form the integer GEMM of the ``*_int8`` query scorers reads (uint8 with zero point
    128). A zero vector gets scale 0 and codes 128. Dequantized: ``(codes - 128) * scale[..., None]``;
    each value is within ``scale / 2`` of ``x``.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.rint(x / safe[..., None])
    np.clip(codes, -127, 127, out=codes)
    codes += 128.0
    return codes.astype(np.uint8), scale


def store_locals(
    storage: str, local: np.ndarray, gram: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Locals ``[N, P, D]`` and Grams ``[N, P, P]`` (float32) as ``storage`` keeps them -> ``(local, scale,
    gram)``.

    ``float32``: as given. ``int8``: per-vector codes (uint8, + 128) and scales ``[N, P]``, and the
    Grams of the dequantized locals in float16 (the scorer then scores the dequantized item exactly).
    """
    if storage == "float32":
        return local, None, gram
    if storage != "int8":
        raise InputError(f"locals storage must be one of {STORAGE}, got {storage!r}")
    codes, scale = quantize_vectors(local)
    deq = np.empty(codes.shape, np.float32)
    dequantize_into(deq, codes, scale)
    return codes, scale, np.matmul(deq, deq.transpose(0, 2, 1)).astype(np.float16)


def dequantize_into(out: np.ndarray, codes: np.ndarray, scale: np.ndarray) -> None:
    """``out[...] = (codes - 128) * scale[..., None]`` (float32 ``out``, uint8 ``codes``)."""
    np.subtract(codes, np.float32(128.0), out=out, dtype=np.float32)
    np.multiply(out, scale[..., None], out=out)


def int8_codes_as_stored(codes: np.ndarray) -> np.ndarray:
    """Signed int8 codes (an index saved before codes were stored + 128) in the stored uint8 form (a copy)."""
    return np.asarray(codes, np.int8).view(np.uint8) ^ np.uint8(0x80)


# ---- stage 1: compressed codes searched by FAISS, rescored from float32 rows -----------------
class Stage1Codec:
    """Compressed stage-1 storage (``"int8"``, the only one) and its error bound.

    Codes ``round(x / sigma)`` in ``[-127, 127]`` with per-dimension scales ``sigma``
    (FAISS ``QT_8bit_direct_signed`` searched with ``q * sigma``). ``peak`` tracks ``max |x_j|`` per
    dimension over the encoded items (the float32 summation error of the bound).

    Raises:
        BackendUnavailableError: faiss is not installed.
    """

    def __init__(
        self, storage: str, dim: int, sigma: np.ndarray | None = None, peak: np.ndarray | None = None
    ) -> None:
        if storage != "int8":
            raise InputError(f"compressed stage-1 storage must be 'int8', got {storage!r}")
        self.faiss = import_faiss(f"a layout with a {storage} stage 1", "the fp32 layout")
        self.storage = storage
        self.dim = int(dim)
        self.sigma = None if sigma is None else np.ascontiguousarray(sigma, dtype=np.float32)
        self.peak = np.zeros(self.dim, np.float32) if peak is None else np.asarray(peak, np.float32).copy()
        self.l1max = (
            0 if self.sigma is None else 127 * self.dim
        )  # largest sum_j |code_j| (int8; refined on encode)
        self._fitted_l1 = self.sigma is None  # a codec given saved scales starts from the worst case
        self._qtype = self.faiss.ScalarQuantizer.QT_8bit_direct_signed

    @property
    def code_dtype(self) -> np.dtype[Any]:
        return np.dtype(np.int8)

    def fit(self, x: np.ndarray) -> None:
        """Per-dimension int8 scales from ``x [N, 2D]`` (``max |x_j| / 127``, at least a tiny floor)."""
        self.fit_peak(
            np.abs(np.asarray(x, np.float32)).max(axis=0) if len(x) else np.zeros(self.dim, np.float32)
        )

    def fit_peak(self, peak: np.ndarray) -> None:
        """Per-dimension int8 scales from the largest ``|x_j|`` per dimension (codes then need
        re-encoding)."""
        self.sigma = (np.maximum(np.asarray(peak, np.float32), 1e-12) / 127.0).astype(np.float32)
        self.l1max, self._fitted_l1 = 0, True

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes of ``x [N, 2D]`` and the boolean ``[N]`` of outliers (int8 values past the scale's range)."""
        x = np.asarray(x, np.float32)
        if len(x):
            self.peak = np.maximum(
                self.peak, np.abs(x).max(axis=0)
            )  # replaced, not changed: views keep theirs
        if self.sigma is None:
            self.fit(x)
        assert self.sigma is not None
        y = x / self.sigma
        out = (np.abs(y) > 127.5).any(axis=1)
        np.rint(y, out=y)
        np.clip(y, -127, 127, out=y)
        codes = y.astype(np.int8)
        if len(codes):
            self.l1max = max(self.l1max if self._fitted_l1 else 0, int(np.abs(y).sum(axis=1).max()))
            self._fitted_l1 = True
        return codes, out

    def new_index(self) -> Any:
        """An empty FAISS index searching codes of this storage by inner product."""
        return self.faiss.IndexScalarQuantizer(self.dim, self._qtype, self.faiss.METRIC_INNER_PRODUCT)

    def add_codes(self, index: Any, codes: np.ndarray) -> None:
        """Append int8 ``codes [N, 2D]`` to a FAISS index of :meth:`new_index`."""
        if not len(codes):
            return
        raw = np.ascontiguousarray(codes, dtype=np.int8).view(np.uint8) ^ np.uint8(0x80)  # FAISS: value + 128
        index.add_sa_codes(np.ascontiguousarray(raw))

    def codes_of(self, index: Any) -> np.ndarray:
        """The int8 codes held by a FAISS index, ``[ntotal, 2D]`` (a copy)."""
        raw = self.faiss.vector_to_array(index.codes).reshape(index.ntotal, -1)
        return (raw ^ np.uint8(0x80)).view(np.int8)

    def query(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What FAISS is searched with for float32 queries ``q [Q, 2D]``, and ``[Q]`` factors turning its
        scores
        into approximate inner products.

        FAISS scans int8 codes against an *integer* query (its byte kernel rounds the query to
        integers), so the query ``q * sigma`` is scaled to span ``[-127, 127]`` and rounded here.
        """
        q = np.ascontiguousarray(q, dtype=np.float32)
        assert self.sigma is not None
        qs = q.astype(np.float64) * self.sigma
        lam = 127.0 / np.maximum(np.abs(qs).max(axis=1), 1e-30)  # [Q]
        return np.ascontiguousarray(np.rint(qs * lam[:, None]), dtype=np.float32), 1.0 / lam

    def inner_products(self, base: np.ndarray, ids: np.ndarray, q: np.ndarray) -> np.ndarray:
        """``base[ids] @ q [dim]`` in float32 for float32 rows ``base [n, dim]``, read in place on this
        thread (FAISS ``fvec_inner_products_by_idx``: no copy of the rows).

        Rescoring reads a few hundred rows: one thread reads them faster than numpy's BLAS wakes a
        second one, which waits for a free core when the machine is busy.
        """
        q = np.ascontiguousarray(q, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty(len(ids), np.float32)
        if not len(ids):
            return out
        if base.ndim != 2 or base.shape[1] != q.shape[0]:
            raise InputError(f"rows of shape {base.shape} cannot be scored against a query of {q.shape[0]}")
        if base.dtype != np.float32 or not base.flags.c_contiguous:  # not stored so: copy just the rows
            base = np.ascontiguousarray(np.take(base, ids, axis=0), dtype=np.float32)
            ids = np.arange(len(ids), dtype=np.int64)
        ptr = self.faiss.swig_ptr
        self.faiss.fvec_inner_products_by_idx(ptr(out), ptr(q), ptr(base), ptr(ids), q.shape[0], 1, len(ids))
        return out

    def bound(self, q: np.ndarray) -> np.ndarray:
        """``[Q]``: the most a compressed score can differ from the float32 one, for any stored non-outlier
        item.

        ``sum_j |q_j| sigma_j / 2`` (codes rounded to the nearest step) ``+ l1 / (2 lam)`` (the query
        rounded to integers, ``l1`` the largest ``sum_j |code_j|`` of any item), plus the float32 summation
        error of the two dot products (``2 * 2D * 2^-24 * sum_j |q_j| peak_j``).
        """
        aq = np.abs(np.asarray(q, np.float32)).astype(np.float64)
        mass = aq @ self.peak.astype(np.float64)
        assert self.sigma is not None
        inv_lam = np.abs(aq * self.sigma).max(axis=1) / 127.0
        quant = 0.5 * (aq @ self.sigma.astype(np.float64)) + 0.5 * inv_lam * float(self.l1max)
        return (quant + 2.0 * self.dim * _F32_EPS * (mass + 1.0)).astype(np.float64)
