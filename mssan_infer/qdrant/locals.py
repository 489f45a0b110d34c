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
from mssan_infer.gallery.base import Candidates
from mssan_infer.gallery.storage import int8_codes_as_stored, store_locals

__all__ = ["SidecarLocals", "FOLDER", "STORAGE_OF", "write_arrays"]

FOLDER = "mssan_locals"
# QdrantOptions.local_dtype -> the in-memory gallery's storage of locals
STORAGE_OF = {"float32": "float32", "uint8": "int8"}
_SEG = re.compile(r"seg-(\d{8})")


def write_arrays(
    folder: Path, local: np.ndarray, scale: np.ndarray | None, mask: np.ndarray, gram: np.ndarray
) -> None:
    """A segment's rerank inputs as ``local.npy`` (stored dtype), ``scale.npy`` (int8 only), ``mask.npy``
    and ``gram.npy`` in ``folder`` (each written and fsync'd; the caller syncs the folder)."""
    write_npy(folder / "local.npy", local)
    if scale is not None:
        write_npy(folder / "scale.npy", scale)
    write_npy(folder / "mask.npy", np.ascontiguousarray(mask, dtype=np.float32))
    write_npy(folder / "gram.npy", gram)


class SidecarLocals:
    """Append-only segments of one gallery's rerank inputs (see the module docstring).

    Args:
        shard: the Edge shard's folder (the segments go in ``shard/mssan_locals``).
        local_dim: ``D``.
        storage: ``"float32"`` or ``"int8"``.
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
            write_arrays(tmp, stored, scale, mask, grams)
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
                    local = load("local.npy")
                    if local.dtype == np.int8:  # written before int8 codes were stored + 128
                        local = int8_codes_as_stored(local)
                    self._open[seg] = (local, scale, load("mask.npy"), load("gram.npy"))
                except (OSError, ValueError) as e:
                    raise IndexFileError(
                        f"the locals of segment {seg} beside the Qdrant Edge shard are missing or damaged "
                        f"({d}: {e}); rebuild the gallery with `index --overwrite`"
                    ) from e
            return self._open[seg]

    def gather(self, locs: Sequence[Any]) -> Candidates:
        """The rerank inputs of the rows ``locs`` (``[segment, row]`` each) as stored, trimmed to the
        longest item among them: one fancy-indexed copy per segment and array."""
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
        int8 = self.storage == "int8"
        out_local = np.full((k, width, d), 128 if int8 else 0, np.uint8 if int8 else np.float32)
        out_scale = np.zeros((k, width), np.float32) if int8 else None
        out_mask = np.zeros((k, width), np.float32)
        out_gram = np.zeros((k, width, width), np.float16 if int8 else np.float32)
        for pos, rows, local, scale, m, gram, w in parts:
            if len(parts) == 1 and w == width and np.array_equal(pos, np.arange(k)):
                out_local = np.ascontiguousarray(local[rows, :w], out_local.dtype)
                out_gram = np.ascontiguousarray(gram[rows, :w, :w], out_gram.dtype)
            else:
                out_local[pos, :w] = local[rows, :w]
                out_gram[pos, :w, :w] = gram[rows, :w, :w]
            if out_scale is not None and scale is not None:
                out_scale[pos, :w] = scale[rows, :w]
            out_mask[pos, :w] = m
        return Candidates(out_local, out_scale, out_mask, out_gram)

    def close(self) -> None:
        with self._lock:
            self._open.clear()
