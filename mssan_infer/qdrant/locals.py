"""The rerank inputs of a Qdrant Edge gallery, in memory-mapped files beside its shard.

Qdrant finds the candidates (stage 1, filters, ids, payload); the candidates' locals, masks and Grams
are read from here as arrays, never through the binding's Python lists. Each ``add`` writes one
segment: ``mssan_locals/seg-NNNNNNNN/{local,scale,mask,gram}.npy`` in the storage of the gallery's
layout (:func:`mssan_infer.gallery.storage.store_locals`, the in-memory gallery's own formats), and
each point's payload addresses its row as ``mssan_loc = [segment, row]``.

Crash safety: a segment is written to a temp folder, fsync'd and renamed into place (then the parent
is fsync'd) before any of its points is upserted. A process killed between the two writes leaves a
segment no point refers to: the items are not visible, as if never added. Removing items deletes
their points; their rows stay until the gallery is rebuilt (``index --overwrite``).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mssan_infer.errors import IndexFileError
from mssan_infer.files import fsync_dir, write_npy
from mssan_infer.gallery.storage import dequantize_into, store_locals

__all__ = ["SidecarLocals", "FOLDER", "STORAGE_OF"]

FOLDER = "mssan_locals"
# QdrantOptions.local_dtype -> the in-memory gallery's storage of locals
STORAGE_OF = {"float32": "float32", "float16": "float16", "uint8": "int8"}
_SEG = re.compile(r"seg-(\d{8})")


class SidecarLocals:
    """Append-only segments of one gallery's rerank inputs (see the module docstring).

    Args:
        shard: the Edge shard's folder (the segments go in ``shard/mssan_locals``).
        local_dim: ``D``.
        storage: ``"float32"``, ``"float16"`` or ``"int8"``.
    """

    def __init__(self, shard: Path, local_dim: int, storage: str) -> None:
        self.folder = Path(shard) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.local_dim, self.storage = int(local_dim), storage
        self._open: dict[int, tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()
        found = [int(m.group(1)) for p in self.folder.iterdir() if (m := _SEG.fullmatch(p.name))]
        self._next = max(found, default=-1) + 1
        for p in self.folder.iterdir():  # what a killed write left: never referred to
            if p.name.startswith(".seg-"):
                shutil.rmtree(p, ignore_errors=True)

    def write(self, local: np.ndarray, mask: np.ndarray, gram: np.ndarray) -> int:
        """Store one batch (``local [N, P, D]``, ``mask [N, P]``, ``gram [N, P, P]``, float32, checked)
        durably; returns its segment number (row ``j`` of the batch is row ``j`` of the segment)."""
        stored, scale, grams = store_locals(self.storage, local, gram)
        with self._lock:
            seg = self._next
            self._next += 1
        tmp = self.folder / f".seg-{seg:08d}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            write_npy(tmp / "local.npy", stored)
            if scale is not None:
                write_npy(tmp / "scale.npy", scale)
            write_npy(tmp / "mask.npy", np.ascontiguousarray(mask, dtype=np.float32))
            write_npy(tmp / "gram.npy", grams)
            fsync_dir(tmp)
            os.replace(tmp, self.folder / f"seg-{seg:08d}")
            fsync_dir(self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return seg

    def _segment(self, seg: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        with self._lock:
            if seg not in self._open:
                d = self.folder / f"seg-{seg:08d}"
                try:

                    def load(name: str) -> np.ndarray:
                        # a plain ndarray over the mapping: np.memmap's slicing costs more than the copy
                        return np.asarray(np.load(d / name, mmap_mode="r", allow_pickle=False))

                    scale = load("scale.npy") if self.storage == "int8" else None
                    self._open[seg] = (load("local.npy"), scale, load("mask.npy"), load("gram.npy"))
                except (OSError, ValueError) as e:
                    raise IndexFileError(
                        f"the locals of segment {seg} beside the Qdrant Edge shard are missing or damaged "
                        f"({d}: {e}); rebuild the gallery with `index --overwrite`"
                    ) from e
            return self._open[seg]

    def gather(self, locs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(local [K, W, D], mask [K, W], gram [K, W, W])`` float32 of the rows ``locs`` (``[segment, row]``
        each), ``W`` the longest item among them: one fancy-indexed copy per segment and array."""
        by_seg: dict[int, list[tuple[int, int]]] = {}  # segment -> [(position in the output, row)]
        for at, loc in enumerate(locs):
            try:
                seg, row = int(loc[0]), int(loc[1])
            except (TypeError, ValueError, IndexError):
                raise IndexFileError(
                    f"a point's mssan_loc is {loc!r}, not [segment, row]; rebuild the gallery"
                ) from None
            by_seg.setdefault(seg, []).append((at, row))
        parts = []
        for seg, members in by_seg.items():
            local, scale, mask, gram = self._segment(seg)
            pos = np.array([p for p, _ in members], np.int64)
            rows = np.array([r for _, r in members], np.int64)
            if rows.size and not (0 <= rows.min() and rows.max() < local.shape[0]):
                raise IndexFileError(
                    f"a point refers to a row of segment {seg} beyond its {local.shape[0]}; rebuild it"
                )
            m = mask[rows]  # [k, P]
            real = m.any(0)
            w = int(np.flatnonzero(real)[-1]) + 1 if real.any() else 1
            parts.append((pos, rows, local, scale, m[:, :w], gram, w))
        width = max([1] + [w for *_, w in parts])
        k, d = len(locs), self.local_dim
        out_local = np.zeros((k, width, d), np.float32)
        out_mask = np.zeros((k, width), np.float32)
        out_gram = np.zeros((k, width, width), np.float32)
        for pos, rows, local, scale, m, gram, w in parts:
            if scale is not None:
                block = np.empty((len(rows), w, d), np.float32)
                dequantize_into(block, local[rows, :w], scale[rows, :w])
                out_local[pos, :w] = block
            else:
                out_local[pos, :w] = local[rows, :w]
            out_mask[pos, :w] = m
            out_gram[pos, :w, :w] = gram[rows, :w, :w]
        return out_local, out_mask, out_gram

    def close(self) -> None:
        with self._lock:
            self._open.clear()
