"""Index folders: galleries saved atomically with sha256 of every file, and loaded back verified.

Layout (a folder): ``index.json`` (format, version, bundle id, gallery metadata, sha256 of
every file) plus ``{gallery}_{array}.npy``, ``{gallery}_ids.json`` and, when items carry them,
``{gallery}_meta.json`` (metadata), ``{gallery}_text.json`` (caption texts) and ``{gallery}_source.json``
(source paths) per gallery: JSON lists aligned with the ids (``null`` where an item has none). Nothing
is pickled. A save writes a temp folder beside the target and swaps it in with
:func:`mssan_infer.files.swap_in` (one atomic directory exchange; two renames where the platform has
none, and :func:`load_index` then puts back a previous index left aside by a save killed between them).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from mssan_infer.errors import IndexFileError, IndexWriteError, InputError, MssanError
from mssan_infer.files import (
    fsync_dir,
    read_versioned_json,
    recover_swap,
    release_rows,
    rows_per_chunk,
    safe_member,
    sha256_file,
    swap_in,
    write_npy,
    write_npy_parts,
)
from mssan_infer.gallery.base import ItemId, check_id, check_labels
from mssan_infer.gallery.filters import check_metadata
from mssan_infer.gallery.memory import MemoryGallery
from mssan_infer.gallery.storage import (
    Layout,
    Stage1Codec,
    check_saved_storage,
    int8_codes_as_stored,
    local_dtype,
    store_locals,
)
from mssan_infer.names import INDEX_FORMAT, INDEX_FORMAT_VERSION, INDEX_MANIFEST
from mssan_infer.options import GalleryOptions

__all__ = [
    "save_index",
    "load_index",
    "read_index_manifest",
    "recover_interrupted_save",
    "write_gallery",
    "read_gallery",
    "saved_layout",
    "encode_stage1",
]

log = logging.getLogger(__name__)


# ---- one gallery ------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> str:
    """Write ``obj`` as JSON to ``path`` (fsync'd); returns the file name."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    return path.name


def write_gallery(gallery: MemoryGallery, folder: Path, prefix: str) -> dict[str, Any]:
    """Write one gallery's arrays and ids into ``folder`` (fsync'd) as it is at one moment.

    Returns the manifest entry: the gallery's ``meta()`` (with its layout) plus ``files`` {array: file name}.
    Every layout writes ``stage1`` (float32), ``local``, ``mask``, ``gram`` and ``ids`` (plus ``meta``,
    ``text`` and ``source`` when any item has them); int8 locals add
    ``local_scale`` (one float32 per vector); an int8 stage 1 adds ``stage1_codes``, ``stage1_peak``,
    ``stage1_scale`` (per dimension) and ``stage1_outliers`` (rows kept exact).
    """
    with gallery._lock:  # one consistent moment: meta and view together
        entry = gallery.meta()
        view = gallery.view()
    n, p = view.n, view.max_length
    lay = gallery.layout
    files: dict[str, str] = {}

    def parts(name: str) -> list[tuple[int, np.ndarray]]:
        return [(b.start, getattr(b, name)) for b in view.blocks]

    shapes = {
        "stage1": ((n, gallery.stage1_dim), np.float32),
        "local": ((n, p, gallery.local_dim), local_dtype(lay.local)),
        "mask": ((n, p), np.float32),
        "gram": ((n, p, p), lay.gram),
    }
    if lay.local == "int8":
        shapes["scale"] = ((n, p), np.float32)
    for name, (shape, dtype) in shapes.items():
        key = "local_scale" if name == "scale" else name
        fname = f"{prefix}_{key}.npy"
        write_npy_parts(folder / fname, shape, dtype, parts(name))
        files[key] = fname
    codec = view.codec
    if codec is not None:
        outliers = view.outliers[view.outliers < n] if view.outliers is not None else np.zeros(0, np.int64)
        fname = f"{prefix}_stage1_codes.npy"
        code_parts: Iterator[tuple[int, np.ndarray]]
        if len(outliers):  # items past the scales of the first ones: refit on every item, keep none
            codec = copy.copy(codec)  # the gallery keeps its own
            rows = [(b.start, b.stage1) for b in view.blocks]
            _fit_on_all(codec, rows)
            code_parts = ((a, codes) for a, codes, _ in _encode_all(codec, rows))
            outliers = np.zeros(0, np.int64)
        else:
            subs = view.searcher.subs if view.searcher is not None else ()
            starts = np.cumsum([0] + [ix.ntotal for ix in subs[:-1]]).tolist()
            code_parts = ((int(a), codec.codes_of(ix)) for a, ix in zip(starts, subs))
        write_npy_parts(folder / fname, (n, gallery.stage1_dim), codec.code_dtype, code_parts)
        # every row encoded (its codes' l1 counted) before the scales are recorded
        if next(code_parts, None) is not None:
            raise IndexWriteError(f"the stage-1 codes of {prefix} were not all written; nothing was saved")
        files["stage1_codes"] = fname
        extra: dict[str, np.ndarray] = {"stage1_peak": codec.peak}
        if codec.storage == "int8" and codec.sigma is not None:  # no scales before the first item
            extra.update({"stage1_scale": codec.sigma, "stage1_outliers": outliers})
            entry["layout"]["stage1_l1max"] = int(codec.l1max)
        for key, arr in extra.items():
            fname = f"{prefix}_{key}.npy"
            write_npy(folder / fname, np.asarray(arr))
            files[key] = fname
    files["ids"] = _write_json(folder / f"{prefix}_ids.json", list(view.ids[: view.n]))
    for key, values in (("meta", view.meta), ("text", view.texts), ("source", view.sources)):
        column = list(values[: view.n])
        if any(v is not None for v in column):
            files[key] = _write_json(folder / f"{prefix}_{key}.json", column)
    entry["files"] = files
    return entry


def saved_layout(entry: Mapping[str, Any], where: str = "this index") -> Layout:
    """The layout a manifest entry was saved in.

    Raises:
        IndexFileError: a damaged record, or a removed layout (``fp16``, float16 locals: rebuild the index).
    """
    rec = entry.get("layout")
    if not isinstance(rec, dict):
        raise IndexFileError("the index manifest's layout record is not an object; rebuild the index")
    check_saved_storage(rec.get("stage1"), rec.get("local"), where)
    if str(entry.get("dtype")) != str(rec.get("local")):
        raise IndexFileError(
            f"gallery dtype {entry.get('dtype')!r} does not match its layout's locals "
            f"{rec.get('local')!r}; the index is damaged, rebuild it"
        )
    return Layout(str(rec["stage1"]), str(rec["local"]))


def _conversion(saved: Layout, wanted: Layout, folder: Path) -> None:
    """Refuse a load that would need values the index no longer has (lossy locals loaded as finer ones)."""
    rank = {"float32": 0, "int8": 1}
    if rank[wanted.local] < rank[saved.local]:
        raise InputError(
            f"index {folder} holds {saved.local} locals (layout {saved.name!r}); they cannot be loaded as "
            f"{wanted.local} (the exact values are gone). Load it with layout={saved.name!r}, or rebuild the "
            "index from the features with the layout you want"
        )


def read_gallery(
    folder: Path,
    entry: Mapping[str, Any],
    options: GalleryOptions | None = None,
) -> MemoryGallery:
    """Rebuild a gallery from :func:`write_gallery`'s files (already checksum-verified by the caller).

    With ``options.mmap`` the saved arrays are mapped read-only (later adds go to new segments). A
    compressed stage 1 always maps its float32 rows. ``options.layout`` (default: as saved) converts
    while loading: float32 locals to int8, and any stage 1 to any (every index keeps float32 stage-1
    rows); loading int8 locals as float32 is refused.

    Raises:
        IndexFileError: missing or inconsistent files, or a removed layout (``fp16``: rebuild the index).
        InputError: a layout the saved values cannot give (e.g. int8 locals as float32).
    """
    try:
        files = entry["files"]
        saved = saved_layout(entry, f"index {folder}")
        opts = options if options is not None else GalleryOptions()
        wanted = opts.resolved_layout(saved)
        n = int(entry["n"])
        stage1_dim, local_dim = int(entry["stage1_dim"]), int(entry["local_dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFileError(f"index in {folder} is damaged or incomplete ({e!r}); rebuild it") from e
    except InputError as e:
        raise IndexFileError(f"index in {folder} has an unknown layout ({e}); rebuild it") from e
    _conversion(saved, wanted, folder)
    g = MemoryGallery(stage1_dim, local_dim, dataclasses.replace(opts, layout=wanted))
    mmap = opts.mmap

    def load(key: str, mapped: bool) -> np.ndarray:
        return np.load(
            safe_member(folder, files[key], IndexFileError),
            allow_pickle=False,
            mmap_mode="r" if mapped else None,
        )

    same_local = wanted.local == saved.local
    try:
        st = load("stage1", True if wanted.compressed_stage1 else mmap)
        lo = load("local", mmap or not same_local)
        sc = load("local_scale", mmap) if saved.local == "int8" else None
        ma = load("mask", mmap)
        gr = load("gram", mmap or not same_local)
        with open(safe_member(folder, files["ids"], IndexFileError), encoding="utf-8") as f:
            ids = json.load(f)
        columns: dict[str, Any] = {}
        for key in ("meta", "text", "source"):
            if key in files:
                with open(safe_member(folder, files[key], IndexFileError), encoding="utf-8") as f:
                    columns[key] = json.load(f)
        codes = peak = sigma = outliers = None
        if wanted.stage1 == saved.stage1 and saved.compressed_stage1:
            codes, peak = load("stage1_codes", False), load("stage1_peak", False)
            if saved.stage1 == "int8" and "stage1_scale" in files:
                sigma, outliers = load("stage1_scale", False), load("stage1_outliers", False)
    except IndexFileError:
        raise
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise IndexFileError(f"index in {folder} is damaged or incomplete ({e!r}); rebuild it") from e
    p = lo.shape[1] if lo.ndim == 3 else -1
    if saved.local == "int8" and lo.dtype == np.int8:  # saved before codes were stored + 128
        log.warning(
            "index %s stores int8 codes in the old signed form: converted in memory (not mapped); save "
            "the index again to store them as this version reads them",
            folder,
        )
        lo = int8_codes_as_stored(lo)
    if (
        not isinstance(ids, list)
        or len(ids) != n
        or st.shape != (n, stage1_dim)
        or lo.shape != (n, p, local_dim)
        or ma.shape != (n, p)
        or gr.shape != (n, p, p)
        or lo.dtype != local_dtype(saved.local)
        or gr.dtype.name != saved.gram
        or st.dtype != np.float32
        or ma.dtype != np.float32
        or (sc is not None and (sc.shape != (n, p) or sc.dtype != np.float32))
        or (codes is not None and (codes.shape != (n, stage1_dim) or codes.dtype.name != saved.stage1))
        or (peak is not None and peak.shape != (stage1_dim,))
        or (codes is not None and saved.stage1 == "int8" and n > 0 and sigma is None)
        or (sigma is not None and sigma.shape != (stage1_dim,))
        or (
            outliers is not None
            and (outliers.ndim != 1 or (len(outliers) and not 0 <= outliers.min() <= outliers.max() < n))
        )
    ):
        raise IndexFileError(f"index arrays in {folder} do not match their metadata; rebuild the index")
    try:
        clean: list[ItemId] = [check_id(i) for i in ids]
    except InputError as e:
        raise IndexFileError(f"index ids in {folder} are invalid: {e}") from e
    if len(set(clean)) != n:
        raise IndexFileError(f"index ids in {folder} contain duplicates; rebuild the index")
    try:
        meta = check_metadata(columns["meta"], n) if "meta" in columns else None
        texts = check_labels(columns["text"], n, "texts") if "text" in columns else None
        sources = check_labels(columns["source"], n, "sources") if "source" in columns else None
    except InputError as e:
        raise IndexFileError(
            f"index metadata, texts or sources in {folder} are invalid: {e}; rebuild the index"
        ) from e
    if not same_local:
        lo, sc, gr = _convert_locals(g, lo, gr, ma)
    codec = None
    if wanted.compressed_stage1:
        if codes is not None:
            codec = Stage1Codec(wanted.stage1, stage1_dim, sigma=sigma, peak=peak)
            l1 = (entry.get("layout") or {}).get("stage1_l1max")
            if isinstance(l1, int) and not isinstance(l1, bool) and 0 <= l1 <= 127 * stage1_dim:
                codec.l1max, codec._fitted_l1 = l1, True
        else:
            codec, codes, outliers = encode_stage1(wanted.stage1, st)
    g.adopt(
        (st, lo, ma, gr, sc),
        clean,
        codes=codes,
        codec=codec,
        outliers=outliers,
        meta=meta,
        texts=texts,
        sources=sources,
    )
    return g


def _convert_locals(
    g: MemoryGallery, lo: np.ndarray, gr: np.ndarray, ma: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Saved locals and Grams (mapped) in ``g``'s layout, converted in row blocks (one new copy, no more)."""
    n, p, d = lo.shape
    storage = g.layout.local
    mapped = g.mmap
    new_lo = g._alloc("local", (n, p, d), local_dtype(storage), mapped)
    new_sc = g._alloc("scale", (n, p), np.float32, mapped) if storage == "int8" else None
    new_gr = g._alloc("gram", (n, p, p), g.layout.gram, mapped)
    step = rows_per_chunk(max(1, lo[:1].nbytes * 4))
    for a in range(0, n, step):
        b = min(n, a + step)
        l_, s_, g_ = store_locals(storage, np.asarray(lo[a:b], np.float32), np.asarray(gr[a:b], np.float32))
        new_lo[a:b], new_gr[a:b] = l_, g_
        if new_sc is not None and s_ is not None:
            new_sc[a:b] = s_
        release_rows(lo, a, b)
        release_rows(gr, a, b)
    return new_lo, new_sc, new_gr


def _chunks(rows: list[tuple[int, np.ndarray]], release: bool) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, float32 rows)`` of every ``(start, array)`` in chunks of ``CHUNK_BYTES``; ``release``:
    each chunk of a read-only map is dropped from this process's resident pages once used."""
    for start, arr in rows:
        step = rows_per_chunk(max(1, arr[:1].nbytes))
        for a in range(0, arr.shape[0], step):
            yield start + a, np.asarray(arr[a : a + step], np.float32)
            if release:
                release_rows(arr, a, a + step)


def _fit_on_all(codec: Stage1Codec, rows: list[tuple[int, np.ndarray]], release: bool = False) -> None:
    """Fit ``codec``'s scales on every float32 stage-1 row of ``rows`` (new arrays: a copy of a gallery's
    codec leaves the gallery's unchanged): none of them is an outlier then."""
    peak = np.zeros(codec.dim, np.float32)
    for _, chunk in _chunks(rows, release):
        peak = np.maximum(peak, np.abs(chunk).max(axis=0))
    codec.fit_peak(peak)
    codec.peak = peak


def _encode_all(
    codec: Stage1Codec, rows: list[tuple[int, np.ndarray]], release: bool = False
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(first row, codes, outlier rows)`` of every chunk of ``rows`` under ``codec``; ``codec.l1max`` is
    final once all are taken."""
    for a, chunk in _chunks(rows, release):
        codes, out = codec.encode(chunk)
        yield a, codes, a + np.flatnonzero(out)


def encode_stage1(storage: str, st: np.ndarray) -> tuple[Stage1Codec, np.ndarray, np.ndarray]:
    """A codec fitted on every saved float32 stage-1 row, their codes and outliers (none: the scales fit
    all)."""
    n, dim = st.shape
    codec = Stage1Codec(storage, dim)
    _fit_on_all(codec, [(0, st)], release=True)
    codes = np.empty((n, dim), codec.code_dtype)
    outl = []
    for a, c, o in _encode_all(codec, [(0, st)], release=True):
        codes[a : a + len(c)] = c
        outl.append(o)
    return codec, codes, (np.concatenate(outl) if outl else np.zeros(0, np.int64))


# ---- index folders ------------------------------------------------------------------
def save_index(
    path: str | os.PathLike[str],
    galleries: Mapping[str, MemoryGallery],
    *,
    bundle_id: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``galleries`` (name -> gallery) to the folder ``path`` atomically.

    Everything is written to a temp folder beside ``path`` with sha256 of every
    file in ``index.json``, then swapped into place; an existing index at
    ``path`` is replaced only once the new one is complete.

    Raises:
        IndexFileError: ``path`` exists and is not an mssan index (it is never overwritten).
        IndexWriteError: writing failed (disk full, permissions, a bad path); the previous
            index at ``path``, if any, is unchanged and no temp folder is left behind.
    """
    try:
        return _save_index(Path(path), galleries, bundle_id=bundle_id, extra=extra)
    except (OSError, ValueError) as e:
        if isinstance(e, MssanError):
            raise
        raise IndexWriteError(
            f"cannot write the index to {path}: {e}. Free some space or choose a writable path; "
            "the previous index there (if any) is unchanged"
        ) from e


def _save_index(
    out: Path, galleries: Mapping[str, MemoryGallery], *, bundle_id: str, extra: Mapping[str, Any] | None
) -> Path:
    if out.exists() and not (out.is_dir() and ((out / INDEX_MANIFEST).is_file() or not any(out.iterdir()))):
        raise IndexFileError(f"{out} exists and is not an mssan index folder; choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries = {name: write_gallery(g, tmp, name) for name, g in galleries.items()}
        digests = {
            fname: sha256_file(tmp / fname) for entry in entries.values() for fname in entry["files"].values()
        }
        manifest = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "bundle_id": bundle_id,
            "galleries": entries,
            "files": digests,
            **dict(extra or {}),
        }
        with open(tmp / INDEX_MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        # commits, or raises with the previous index in place; a crash between the two renames of
        # the fallback leaves the previous index aside, which load_index puts back
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved index %s (%s)", out, ", ".join(f"{k}: {len(g)}" for k, g in galleries.items()))
    return out


def recover_interrupted_save(root: Path) -> bool:
    """Put back the previous index when a save was killed between the two renames of a swap without an
    atomic exchange (:func:`mssan_infer.files.recover_swap` with the index manifest as the marker).

    When ``root`` is missing and a complete ``.NAME.old-*`` folder lies beside it, the newest one
    is renamed back to ``root``. Returns whether it did. :func:`load_index` calls this.
    """
    return recover_swap(Path(root), INDEX_MANIFEST)


def read_index_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``index.json`` of an index folder (format and version only; files not hashed).

    Reads only: it never renames anything (see :func:`load_index` for recovery).

    Raises:
        IndexFileError: missing/invalid manifest, unknown format, newer version.
    """
    root = Path(path)
    mpath = root / INDEX_MANIFEST
    if not mpath.is_file():
        raise IndexFileError(
            f"{root} is not an mssan index ({INDEX_MANIFEST} missing); build one with "
            f"`python -m mssan_infer index ... --out {root}` (or Retriever.save)"
        )
    manifest = read_versioned_json(
        mpath,
        error=IndexFileError,
        fix="rebuild the index",
        version=INDEX_FORMAT_VERSION,
        format_tag=INDEX_FORMAT,
    )
    for key in ("bundle_id", "galleries", "files"):
        if key not in manifest:
            raise IndexFileError(f"{mpath} lacks {key!r}; rebuild the index")
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["galleries"], dict):
        raise IndexFileError(f"{mpath} is malformed; rebuild the index")
    for entry in manifest["galleries"].values():
        if not isinstance(entry, dict) or not isinstance(entry.get("files", {}), dict):
            raise IndexFileError(
                f"{mpath} is malformed (a gallery entry is not an object); rebuild the index"
            )
        for fname in entry.get("files", {}).values():
            if fname not in manifest["files"]:
                raise IndexFileError(f"index file {fname} has no sha256 in the manifest; rebuild the index")
    return manifest


def load_index(
    path: str | os.PathLike[str],
    *,
    bundle_id: str | None = None,
    verify: bool = True,
    options: GalleryOptions | None = None,
) -> tuple[dict[str, MemoryGallery], dict[str, Any]]:
    """Load an index folder written by :func:`save_index`.

    A previous index left aside by a save killed between its two renames (platforms without an
    atomic directory exchange) is put back first (:func:`recover_interrupted_save`).

    Args:
        bundle_id: when given, the index must have been built with this bundle.
        verify: check the sha256 of every file.
        options: :class:`~mssan_infer.options.GalleryOptions` (``layout`` defaults to what each gallery was
            saved with; another converts while loading, see :func:`read_gallery`).
    Returns:
        ``(galleries, manifest)``.
    Raises:
        IndexFileError: missing, damaged, tampered, newer-format or other-bundle index.
        InputError: a ``layout``/``dtype`` the saved values cannot give.
    """
    root = Path(path)
    recover_interrupted_save(root)
    manifest = read_index_manifest(root)
    if bundle_id is not None and manifest["bundle_id"] != bundle_id:
        raise IndexFileError(
            f"index {root} was built with bundle {manifest['bundle_id']}, but the loaded bundle is "
            f"{bundle_id}; "
            "its vectors would not match. Rebuild the index with this bundle."
        )
    for fname, digest in manifest["files"].items():
        try:
            fpath = safe_member(root, fname, IndexFileError)
        except IndexFileError as e:
            raise IndexFileError(f"index manifest names an unsafe file {fname!r}: {e}") from e
        if not fpath.is_file():
            raise IndexFileError(
                f"index file {fname} is missing from {root}; copy the whole folder or rebuild"
            )
        if verify and sha256_file(fpath) != digest:
            raise IndexFileError(
                f"index file {fname} does not match its sha256 (truncated or modified); rebuild the index"
            )
    galleries = {name: read_gallery(root, entry, options) for name, entry in manifest["galleries"].items()}
    return galleries, manifest
