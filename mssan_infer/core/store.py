"""Index folders: galleries saved atomically with sha256 of every file, and loaded back verified.

Layout (a folder): ``index.json`` (format, version, bundle id, gallery metadata, sha256 of
every file) plus ``{gallery}_{array}.npy``, ``{gallery}_ids.json`` and, when items carry metadata,
``{gallery}_meta.json`` per gallery. Nothing
is pickled. A save writes a temp folder beside the target and swaps it in with one atomic
directory exchange (two renames where the platform has none; :func:`load_index` then puts
back a previous index left aside by a save killed between them).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .contract import ItemId, check_id
from .errors import IndexFileError, IndexWriteError, InputError, MssanError
from .files import exchange_dirs, fsync_dir, safe_member, sha256_file, write_npy
from .filters import check_metadata
from .layout import INDEX_FORMAT, INDEX_FORMAT_VERSION, INDEX_MANIFEST
from .memory import ARRAYS, GalleryIndex

__all__ = ["save_index", "load_index", "read_index_manifest", "recover_interrupted_save", "write_gallery",
           "read_gallery"]

log = logging.getLogger(__name__)


# ---- one gallery ------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> str:
    """Write ``obj`` as JSON to ``path`` (fsync'd); returns the file name."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    return path.name


def write_gallery(gallery: GalleryIndex, folder: Path, prefix: str) -> dict[str, Any]:
    """Write one gallery's arrays and ids into ``folder`` (fsync'd) as it is at one moment.

    Returns the manifest entry: the gallery's ``meta()`` plus ``files`` {array: file name}.
    """
    with gallery._lock:                      # one consistent moment: meta and view together
        entry = gallery.meta()
        view = gallery.view()
    files: dict[str, str] = {}
    for name, src in zip(ARRAYS, (view.stage1, view.local, view.mask, view.gram)):
        fname = f"{prefix}_{name}.npy"
        write_npy(folder / fname, src)
        files[name] = fname
    files["ids"] = _write_json(folder / f"{prefix}_ids.json", list(view.ids[: view.n]))
    meta = list(view.meta[: view.n])
    if any(m is not None for m in meta):
        files["meta"] = _write_json(folder / f"{prefix}_meta.json", meta)
    entry["files"] = files
    return entry


def read_gallery(
    folder: Path,
    entry: Mapping[str, Any],
    *,
    mmap: bool = False,
    dtype: str | None = None,
    **options: Any,
) -> GalleryIndex:
    """Rebuild a gallery from :func:`write_gallery`'s files (already checksum-verified by the caller).

    With ``mmap`` the saved arrays are mapped read-only (copied to the spill folder only when
    the gallery next grows). ``dtype`` converts the stored locals; ``options`` go to
    :class:`GalleryIndex` (``spill_dir``, ``stage1``, ``faiss_options``).

    Raises:
        IndexFileError: missing or inconsistent files.
    """
    try:
        files = entry["files"]
        saved_dtype = str(entry["dtype"])
        g = GalleryIndex(int(entry["stage1_dim"]), int(entry["local_dim"]), dtype=dtype or saved_dtype,
                         mmap=mmap, **options)
        arrays = tuple(
            np.load(safe_member(folder, files[name], IndexFileError), allow_pickle=False,
                    mmap_mode="r" if mmap else None)
            for name in ARRAYS
        )
        with open(safe_member(folder, files["ids"], IndexFileError), encoding="utf-8") as f:
            ids = json.load(f)
        meta = None
        if "meta" in files:
            with open(safe_member(folder, files["meta"], IndexFileError), encoding="utf-8") as f:
                meta = json.load(f)
        n = int(entry["n"])
    except IndexFileError:
        raise
    except (KeyError, TypeError, ValueError, OSError, InputError) as e:
        raise IndexFileError(f"index in {folder} is damaged or incomplete ({e!r}); rebuild it") from e
    st, lo, ma, gr = arrays
    p = lo.shape[1] if lo.ndim == 3 else -1
    if (
        not isinstance(ids, list) or len(ids) != n or st.shape != (n, g.stage1_dim)
        or lo.shape != (n, p, g.local_dim) or ma.shape != (n, p) or gr.shape != (n, p, p)
        or lo.dtype.name != saved_dtype or gr.dtype.name != saved_dtype
        or st.dtype != np.float32 or ma.dtype != np.float32
    ):
        raise IndexFileError(f"index arrays in {folder} do not match their metadata; rebuild the index")
    try:
        clean: list[ItemId] = [check_id(i) for i in ids]
    except InputError as e:
        raise IndexFileError(f"index ids in {folder} are invalid: {e}") from e
    if len(set(clean)) != n:
        raise IndexFileError(f"index ids in {folder} contain duplicates; rebuild the index")
    if meta is not None:
        try:
            meta = check_metadata(meta, n)
        except InputError as e:
            raise IndexFileError(f"index metadata in {folder} is invalid: {e}; rebuild the index") from e
    g.adopt((st, lo, ma, gr), clean, meta)
    return g


# ---- index folders ------------------------------------------------------------------
def save_index(
    path: str | os.PathLike[str],
    galleries: Mapping[str, GalleryIndex],
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
    out: Path, galleries: Mapping[str, GalleryIndex], *, bundle_id: str, extra: Mapping[str, Any] | None
) -> Path:
    if out.exists() and not (out.is_dir() and ((out / INDEX_MANIFEST).is_file() or not any(out.iterdir()))):
        raise IndexFileError(f"{out} exists and is not an mssan index folder; choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries = {name: write_gallery(g, tmp, name) for name, g in galleries.items()}
        digests = {fname: sha256_file(tmp / fname) for entry in entries.values() for fname in entry["files"].values()}
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
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists() and exchange_dirs(tmp, out):
            old = tmp                                   # tmp now holds the previous index
        else:
            # no atomic exchange here: a crash between these two renames leaves the previous
            # index at ``old``, which load_index puts back (see recover_interrupted_save)
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
        fsync_dir(out.parent)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved index %s (%s)", out, ", ".join(f"{k}: {len(g)}" for k, g in galleries.items()))
    return out


def recover_interrupted_save(root: Path) -> bool:
    """Put back the previous index when a save was killed between its two renames (non-Linux path).

    When ``root`` is missing and a complete ``.NAME.old-*`` folder lies beside it, the newest one
    is renamed back to ``root``. Returns whether it did. :func:`load_index` calls this.
    """
    if root.exists() or not root.parent.is_dir():
        return False
    olds = [p for p in root.parent.glob(f".{root.name}.old-*") if (p / INDEX_MANIFEST).is_file()]
    if not olds:
        return False
    latest = max(olds, key=lambda p: p.stat().st_mtime)
    try:
        os.replace(latest, root)
    except OSError:
        return False
    log.warning("restored index %s from %s, left by an interrupted save", root, latest.name)
    return True


def read_index_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked ``index.json`` of an index folder (format and version only; files not hashed).

    Reads only: it never renames anything (see :func:`load_index` for recovery).

    Raises:
        IndexFileError: missing/invalid manifest, unknown format, newer version.
    """
    root = Path(path)
    mpath = root / INDEX_MANIFEST
    if not mpath.is_file():
        raise IndexFileError(f"{root} is not an mssan index ({INDEX_MANIFEST} missing); build one with Retriever.save")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexFileError(f"{mpath} is not valid JSON ({e}); the index is damaged, rebuild it") from e
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise IndexFileError(f"{mpath} is not an mssan index manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise IndexFileError(f"{mpath} has no integer format_version; rebuild the index")
    if version > INDEX_FORMAT_VERSION:
        raise IndexFileError(
            f"index format {version} is newer than this mssan_infer reads ({INDEX_FORMAT_VERSION}); upgrade mssan_infer"
        )
    if version < 1:
        raise IndexFileError(f"index format {version} is not supported; rebuild the index")
    for key in ("bundle_id", "galleries", "files"):
        if key not in manifest:
            raise IndexFileError(f"{mpath} lacks {key!r}; rebuild the index")
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["galleries"], dict):
        raise IndexFileError(f"{mpath} is malformed; rebuild the index")
    for entry in manifest["galleries"].values():
        if not isinstance(entry, dict) or not isinstance(entry.get("files", {}), dict):
            raise IndexFileError(f"{mpath} is malformed (a gallery entry is not an object); rebuild the index")
        for fname in entry.get("files", {}).values():
            if fname not in manifest["files"]:
                raise IndexFileError(f"index file {fname} has no sha256 in the manifest; rebuild the index")
    return manifest


def load_index(
    path: str | os.PathLike[str],
    *,
    bundle_id: str | None = None,
    verify: bool = True,
    mmap: bool = False,
    dtype: str | None = None,
    **options: Any,
) -> tuple[dict[str, GalleryIndex], dict[str, Any]]:
    """Load an index folder written by :func:`save_index`.

    A previous index left aside by a save killed between its two renames (platforms without an
    atomic directory exchange) is put back first (:func:`recover_interrupted_save`).

    Args:
        bundle_id: when given, the index must have been built with this bundle.
        verify: check the sha256 of every file.
        mmap, dtype, options: see :func:`read_gallery` and :class:`GalleryIndex`.
    Returns:
        ``(galleries, manifest)``.
    Raises:
        IndexFileError: missing, damaged, tampered, newer-format or other-bundle index.
    """
    root = Path(path)
    recover_interrupted_save(root)
    manifest = read_index_manifest(root)
    if bundle_id is not None and manifest["bundle_id"] != bundle_id:
        raise IndexFileError(
            f"index {root} was built with bundle {manifest['bundle_id']}, but the loaded bundle is {bundle_id}; "
            "its vectors would not match. Rebuild the index with this bundle."
        )
    for fname, digest in manifest["files"].items():
        try:
            fpath = safe_member(root, fname, IndexFileError)
        except IndexFileError as e:
            raise IndexFileError(f"index manifest names an unsafe file {fname!r}: {e}") from e
        if not fpath.is_file():
            raise IndexFileError(f"index file {fname} is missing from {root}; copy the whole folder or rebuild")
        if verify and sha256_file(fpath) != digest:
            raise IndexFileError(
                f"index file {fname} does not match its sha256 (truncated or modified); rebuild the index"
            )
    galleries = {
        name: read_gallery(root, entry, mmap=mmap, dtype=dtype, **options)
        for name, entry in manifest["galleries"].items()
    }
    return galleries, manifest
