"""Files: sha256, path confinement inside a bundle or index folder, durable writes, atomic folder swaps."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mssan_infer.errors import BundleError, MssanError

__all__ = [
    "sha256_file",
    "safe_member",
    "write_npy",
    "write_npy_parts",
    "release_rows",
    "fsync_dir",
    "exchange_dirs",
    "swap_in",
    "recover_swap",
    "link_or_copy",
    "read_versioned_json",
    "CHUNK_BYTES",
    "rows_per_chunk",
]

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # copies of large arrays go in blocks of about this many bytes


def rows_per_chunk(row_bytes: int) -> int:
    """Rows of ``row_bytes`` each in one block of :data:`CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def safe_member(root: Path, name: str, error: type[MssanError] = BundleError) -> Path:
    """``root/name``, refusing names that could leave ``root`` (absolute, ``..``, drive letters, symlinks).

    Raises:
        error: (default :class:`BundleError`) for any name that is not a plain relative path inside ``root``.
    """
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or os.path.isabs(name):
        raise error(f"manifest names file {name!r}: only relative paths inside the folder are allowed")
    parts = Path(name).parts
    if any(p in ("..", "") for p in parts) or ":" in parts[0]:
        raise error(f"manifest names file {name!r}: '..' and drive letters are not allowed in paths")
    path = root / name
    probe = root
    for p in parts:
        probe = probe / p
        if probe.is_symlink():
            raise error(f"member {name!r} is a symlink; bundles and indexes must contain plain files only")
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError as e:
        raise error(f"member {name!r} resolves outside the folder {root}") from e
    return path


def write_npy(path: Path, src: np.ndarray) -> None:
    """Write ``src`` as .npy, fsync'd; in row blocks when large (works for memmaps larger than RAM)."""
    if src.nbytes <= CHUNK_BYTES or src.shape[0] == 0:
        with open(path, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(src), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        return
    write_npy_parts(path, src.shape, src.dtype, [(0, src)])


def write_npy_parts(
    path: Path, shape: tuple[int, ...], dtype: Any, parts: Iterable[tuple[int, np.ndarray]]
) -> None:
    """Write a ``shape`` .npy from ``(first row, rows)`` parts, fsync'd, in row blocks.

    Each part lands in the leading corner of its rows (a part narrower than ``shape`` is zero-padded).
    """
    if 0 in shape:  # nothing to map: an empty array
        write_npy(path, np.zeros(shape, dtype))
        return
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
    for start, src in parts:
        if not len(src):
            continue
        step = rows_per_chunk(src[:1].nbytes)
        corner = tuple(slice(0, w) for w in src.shape[1:])
        for a in range(0, src.shape[0], step):
            block = src[a : a + step]
            out[(slice(start + a, start + a + len(block)),) + corner] = block
    out.flush()
    del out
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def release_rows(arr: np.ndarray, a: int, b: int) -> None:
    """Drop rows ``a:b`` of a read-only memory map from this process's resident pages (a hint; no-op
    elsewhere).

    Streaming through a mapped file (converting a saved index) otherwise leaves every page read resident
    in the process until the map is closed.
    """
    import mmap as _mmap

    mm = getattr(arr, "_mmap", None)
    advise = getattr(mm, "madvise", None)
    flag = getattr(_mmap, "MADV_DONTNEED", None)
    if advise is None or flag is None or not isinstance(arr, np.memmap) or b <= a:
        return
    row = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.itemsize
    skew = int(arr.offset) % _mmap.ALLOCATIONGRANULARITY  # the map starts this far before the data
    start, stop = skew + a * row, skew + b * row
    page = _mmap.PAGESIZE
    start = -(-start // page) * page  # only whole pages inside the rows
    stop = (stop // page) * page
    if stop > start:
        try:
            advise(flag, start, stop - start)
        except (OSError, ValueError):
            pass


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the platform or file system cannot.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


_ASIDE = "old"  # .NAME.old-<uuid>: the previous content, between the two renames of a swap without exchange
_TRASH = "trash"  # .NAME.trash-<uuid>: the previous content after a swap, being deleted


def _beside(dst: Path, kind: str) -> Path:
    return dst.with_name(f".{dst.name}.{kind}-{uuid.uuid4().hex}")


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path`` itself (a symlink is not followed); None when nothing is there."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def swap_in(tmp: Path, dst: Path) -> None:
    """Put the finished folder ``tmp`` at ``dst`` in one step, replacing what ``dst`` held (if anything).

    Linux: one atomic exchange (:func:`exchange_dirs`). Where there is none: two renames, ``dst`` to an
    aside folder ``.NAME.old-<uuid>`` beside it, then ``tmp`` to ``dst``; when the second fails the aside
    is put back, and a process killed between them leaves it for :func:`recover_swap`.

    The swap commits when ``dst`` is ``tmp``'s folder. From then on nothing is raised: the previous
    content is renamed to ``.NAME.trash-<uuid>`` and deleted, and an error or an interrupt there only
    leaves it for the next :func:`recover_swap` (an interrupt that lands just after the commit is logged
    and dropped: the replace happened, and the caller must not report it as failed).

    Raises:
        OSError, or an interrupt, before the commit: ``dst`` is as it was and ``tmp`` is still there
            (the caller removes it).
    """
    new = _identity(tmp)
    if new is None:
        raise FileNotFoundError(errno.ENOENT, "the folder to swap in is missing", str(tmp))
    old: Path | None = None  # where the previous content of dst is
    try:
        placed = False
        if not os.path.lexists(dst):
            try:
                os.replace(tmp, dst)
                placed = True
            except OSError as e:  # another save put a folder at dst since the check: replace it below
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        if not placed:
            if exchange_dirs(tmp, dst):
                old = tmp
            else:
                old = _beside(dst, _ASIDE)
                os.replace(dst, old)
                os.replace(tmp, dst)
    except BaseException:
        if _identity(dst) != new:  # not committed
            if old is not None and old != tmp and os.path.lexists(old) and not os.path.lexists(dst):
                os.replace(old, dst)  # the second rename failed: put the previous content back
            raise
        # committed, and an interrupt (or an error past the rename) landed before this function knew
        if old is None and _identity(tmp) not in (None, new):
            old = tmp  # the exchange happened: tmp holds the previous content
        log.warning("interrupted just after %s was replaced: the replace is complete", dst)
    _discard(dst, old)


def _discard(dst: Path, old: Path | None) -> None:
    """After a committed swap: delete the previous content (first renamed to a trash name, so that what an
    interrupt leaves is found by :func:`recover_swap`) and make the swap durable. Never raises."""
    try:
        if old is not None:
            trash = _beside(dst, _TRASH)
            try:
                os.replace(old, trash)  # never mistaken for an aside to put back
            except OSError:
                trash = old
            old = trash
        fsync_dir(dst.parent)
        if old is not None and old.is_symlink():  # dst was a link to a folder: the link goes, not its target
            old.unlink()
        elif old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:  # an interrupt: the replace is done; recover_swap deletes what is left
        log.warning("the previous content of %s is deleted later (%s)", dst, type(e).__name__)


def _leftovers(dst: Path, kind: str) -> list[Path]:
    pattern = f".{glob.escape(dst.name)}.{kind}-*"
    return [p for p in dst.parent.glob(pattern) if p.is_dir() and not p.is_symlink()]


def recover_swap(dst: Path, marker: str | None = None) -> bool:
    """Undo what a process killed inside :func:`swap_in` left: put back the previous content of ``dst``
    when ``dst`` is missing and an aside folder of it lies beside it (the newest one holding ``marker``,
    when given), and delete the leftovers of finished swaps. Returns whether it put one back.

    A missing parent, a read-only folder or a lost race with another process is not an error: what can
    be done is done.
    """
    dst = Path(dst)
    if not dst.parent.is_dir():
        return False
    restored = False
    asides = _leftovers(dst, _ASIDE)
    if not os.path.lexists(dst):
        complete = [p for p in asides if marker is None or (p / marker).is_file()]
        if not complete:
            return False
        latest = max(complete, key=lambda p: p.stat().st_mtime)
        try:
            os.replace(latest, dst)
        except OSError:
            return False
        log.warning("restored %s from %s, left by an interrupted replace", dst, latest.name)
        asides.remove(latest)
        restored = True
    for p in asides + _leftovers(dst, _TRASH):  # dst is complete: these are the previous contents
        shutil.rmtree(p, ignore_errors=True)
    return restored


def link_or_copy(src: str, dst: str) -> str:
    """``shutil.copytree``'s ``copy_function`` that hard-links a file, or copies it (``copy2``) where it
    cannot be linked (another device, a file system without links).

    The copy then shares its files with the source: replace a file of it (write a new one and
    ``os.replace`` it), never write into one.
    """
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def read_versioned_json(
    path: Path,
    *,
    error: type[MssanError],
    fix: str,
    version: int | None = None,
    format_tag: str | None = None,
) -> dict[str, Any]:
    """The JSON object in ``path``: a bundle manifest, an index manifest or a gallery record.

    Args:
        error: the error type to raise (``BundleError``, ``IndexFileError``).
        fix: what the user should do about a damaged file (``"re-export the bundle"``).
        version: when given, ``format_version`` must be an int, not newer than this (upgrade mssan_infer)
            and not older (``fix``).
        format_tag: when given, the object's ``format`` must be this.
    Raises:
        error: unreadable file, not JSON, not an object, another format, a missing or unsupported version.
    """
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{path} is not valid JSON ({e}); it is damaged: {fix}") from e
    if not isinstance(obj, dict):
        raise error(f"{path} is not a JSON object; {fix}")
    if format_tag is not None and obj.get("format") != format_tag:
        raise error(
            f"{path} is not an {format_tag.replace('-', ' ')} manifest (format {obj.get('format')!r}); {fix}"
        )
    if version is not None:
        found = obj.get("format_version")
        if not isinstance(found, int) or isinstance(found, bool):
            raise error(f"{path} has no integer format_version; {fix}")
        if found > version:
            raise error(
                f"{path}: format {found} is newer than this mssan_infer reads ({version}); upgrade "
                "mssan_infer"
            )
        if found < version:
            raise error(f"{path}: format {found} is older than this mssan_infer reads ({version}); {fix}")
    return obj
