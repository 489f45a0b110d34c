"""Reading the files a CLI user gives: one item per line, JSON lines of metadata, ``.npy`` features (checked
from their header, every row finite)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mssan_infer.errors import InputError
from mssan_infer.files import rows_per_chunk
from mssan_infer.gallery.filters import RESERVED_PREFIX, check_metadata
from mssan_infer.images.files import LIST_SUFFIXES

__all__ = ["read_lines", "load_features", "check_finite", "read_metadata", "ids_to_remove"]


_NPY_MAGIC = b"\x93NUMPY"


def read_lines(path: str | os.PathLike[str], what: str, flag: str | None = None) -> list[str]:
    """The lines of a UTF-8 text file, one item per line: line ``i`` (counting from 1) is item ``i - 1``.

    ``\\n``, ``\\r\\n`` and ``\\r`` all end a line and a UTF-8 byte-order mark is dropped; each line is kept
    as written otherwise. Blank lines at the end of the file are ignored. A blank (or whitespace-only) line
    before the last item is an error: skipping it would give every later line the next line's number.

    Args:
        what: what the lines are, plural (``"captions"``, ``"image ids"``), for messages.
        flag: the CLI option that named the file (``"--texts"``), for messages.
    Raises:
        InputError: the file cannot be read or is not UTF-8, a blank line (naming its number, the file and
            the flag), or no lines at all.
    """
    name = f"{flag} {path}" if flag else f"{what} file {path}"
    try:
        with open(path, encoding="utf-8-sig") as f:  # universal newlines: \r\n and \r read as \n
            lines = [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {what} file {path}: {e}") from e
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i for i, line in enumerate(lines, 1) if not line.strip()]
    if blank:
        more = f" (and {len(blank) - 1} more blank lines)" if len(blank) > 1 else ""
        raise InputError(
            f"{name}: line {blank[0]} is blank{more}; each line holds one of the {what} and its line "
            "number counts, so a blank line would shift every line after it: delete the line or fill it in"
        )
    if not lines:
        raise InputError(f"{name} is empty: write the {what}, one per line")
    return lines


def _header(path: Path, flag: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, from its header (nothing is loaded or unpickled)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            if magic == _NPY_MAGIC:
                f.seek(0)
                version = np.lib.format.read_magic(f)
                shape, _, dtype = np.lib.format._read_array_header(f, version)  # type: ignore[attr-defined]
    except OSError as e:
        what = "is a folder" if path.is_dir() else ("does not exist" if not path.exists() else str(e))
        raise InputError(
            f"cannot read features {flag} {path}: it {what}; expected a .npy array [N, R, Dv]"
        ) from e
    except ValueError as e:
        raise InputError(f"cannot read features {flag} {path}: a damaged .npy header ({e})") from e
    if magic != _NPY_MAGIC:
        raise InputError(
            f"{flag} {path} is not a .npy file (it does not start with the .npy header); expected region "
            "features [N, R, Dv] saved with numpy.save"
            + ("" if flag == "--image" else ", or image files with a bundle exported with --pixels")
        )
    return tuple(shape), np.dtype(dtype)


def load_features(path: str | os.PathLike[str], flag: str = "--images") -> np.ndarray:
    """Region features ``[N, R, Dv]`` from a .npy file (memory-mapped, no pickle).

    Raises:
        InputError: not a .npy file, Python objects in it, another rank or dtype, no rows, or truncated.
    """
    p = Path(path)
    shape, dtype = _header(p, flag)
    if dtype.hasobject:
        raise InputError(
            f"{flag} {p} holds Python objects (a pickled array), which are never loaded; save the features "
            "as a float32 array [N, R, Dv]"
        )
    if len(shape) != 3:
        raise InputError(f"{flag} {p} must hold one array [N, R, Dv], got shape {shape}")
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"{flag} {p}: image features must be real numbers (float32), got dtype {dtype}")
    if shape[0] == 0:
        raise InputError(f"{flag} {p} holds no images (shape {shape}); give at least one")
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read features {flag} {p} (truncated or damaged?): {e}") from e


def check_finite(feats: np.ndarray, path: str | os.PathLike[str], flag: str, first: int = 0) -> None:
    """Refuse NaN/inf (also after the cast to float32), naming the file and the first bad row."""
    n = feats.shape[0]
    step = rows_per_chunk(max(1, feats[:1].nbytes))
    bad: list[int] = []
    for a in range(0, n, step):
        with np.errstate(over="ignore", invalid="ignore"):
            block = np.asarray(feats[a : a + step], dtype=np.float32)
        rows = np.flatnonzero(~np.isfinite(block).reshape(len(block), -1).all(1))
        bad += (a + rows).tolist()
    if bad:
        i = bad[0]
        with np.errstate(over="ignore", invalid="ignore"):
            one = np.asarray(feats[i], dtype=np.float32)
        region = int(np.flatnonzero(~np.isfinite(one).all(1))[0])
        more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise InputError(
            f"{flag} {path}: row {first + i} has NaN or inf (region {region}){more}; every value must be a "
            "finite float32: fix or drop those rows"
        )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def read_metadata(
    path: str | os.PathLike[str], n: int, what: str, flag: str | None = None
) -> list[dict[str, Any] | None]:
    """One JSON object (or ``null``) per line of a UTF-8 file, for ``n`` items (blank lines as in
    :func:`read_lines`), checked as a gallery checks metadata (so it is refused before anything is added).

    Raises:
        InputError: unreadable file, a blank line, a line that is not a JSON object or null (NaN and
            Infinity included), a key that is empty or reserved, or another count.
    """
    rows: list[dict[str, Any] | None] = []
    name = f"{flag} {path}" if flag else str(path)
    for i, line in enumerate(read_lines(path, what, flag), 1):
        try:
            value = json.loads(line, parse_constant=_no_constant)
        except ValueError as e:
            raise InputError(f"{name} line {i}: not JSON ({e}); write one JSON object per line") from None
        if value is not None and not isinstance(value, dict):
            raise InputError(f"{name} line {i}: expected a JSON object or null, got {type(value).__name__}")
        for key in value or {}:
            if not key or key.startswith(RESERVED_PREFIX):
                raise InputError(
                    f"{name} line {i}: key {key!r} "
                    + ("is empty" if not key else f"starts with {RESERVED_PREFIX!r}, which is reserved")
                    + "; rename it"
                )
        rows.append(value)
    if len(rows) != n:
        raise InputError(f"{name} has {len(rows)} {what} lines for {n} items")
    try:
        return check_metadata(rows, n)  # the gallery's own check, before anything is added
    except InputError as e:
        raise InputError(f"{name}: {e}") from None


def ids_to_remove(ids: Sequence[str]) -> list[str]:
    """``--ids``: the ids, or the lines of one .txt/.lst/.list file."""
    if len(ids) == 1 and Path(ids[0]).suffix.lower() in LIST_SUFFIXES and Path(ids[0]).is_file():
        return read_lines(ids[0], "ids", "--ids")
    return list(ids)
