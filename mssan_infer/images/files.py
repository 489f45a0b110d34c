"""Image files to index: walk a folder, read a list file, keep the files pillow can open, name each one.

``python -m mssan_infer index --images DIR|FILE...|LIST.txt`` collects its images here:

- a folder: the files in it (``recursive``: and in its subfolders) whose extension is one pillow has
  registered an opener for (:func:`image_extensions`: JPEG, PNG, WebP, BMP, GIF, TIFF...), sorted by
  their path relative to the folder, which is also their id (``/``-separated on every OS). Hidden files
  and folders (names starting with ``.``) are left out; other files are listed in ``skipped``;
- a list file (``.txt``, ``.lst`` or ``.list``): one image path per line; a relative path is relative to
  the list file's folder, and the line as written is the id;
- any other file: one image, whatever its extension (pillow decides when it is read); the path as given
  is the id.

Nothing is decoded here: a file that is missing, truncated or not an image is found when it is encoded,
and the CLI reports it with the others at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mssan_infer.errors import InputError

__all__ = [
    "ImageFile",
    "ImageFiles",
    "LIST_SUFFIXES",
    "FEATURES_SUFFIX",
    "image_extensions",
    "is_features_file",
    "collect_images",
]

LIST_SUFFIXES = (".txt", ".lst", ".list")
FEATURES_SUFFIX = ".npy"  # region features [N, R, Dv], never an image list


@dataclass(frozen=True)
class ImageFile:
    """One image to index: where to read it and its id (unless ids are given otherwise)."""

    path: Path
    id: str


@dataclass(frozen=True)
class ImageFiles:
    """What :func:`collect_images` found: the images in order, and the files left out of folders because
    their extension is not an image format's."""

    files: list[ImageFile]
    skipped: list[Path] = field(default_factory=list)


def image_extensions() -> frozenset[str]:
    """Lower-case suffixes (``".jpg"``...) of every format pillow can open in this environment."""
    from PIL import Image

    Image.init()  # registers every plugin pillow ships
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_features_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names region features (a ``.npy`` array) rather than images."""
    return Path(path).suffix.lower() == FEATURES_SUFFIX


def _walk(root: Path, recursive: bool, extensions: frozenset[str]) -> tuple[list[ImageFile], list[Path], int]:
    """Images under ``root`` sorted by relative path, the other files, and the subfolders not entered."""
    found: list[ImageFile] = []
    skipped: list[Path] = []
    not_entered = 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if not recursive:
            not_entered += len(dirs)
            dirs[:] = []
        for name in names:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if path.suffix.lower() in extensions:
                found.append(ImageFile(path, path.relative_to(root).as_posix()))
            else:
                skipped.append(path)
    found.sort(key=lambda f: f.id)
    return found, sorted(skipped), not_entered


def collect_images(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    recursive: bool = False,
    read_list: Callable[[Path], Sequence[str]],
    flag: str = "--images",
) -> ImageFiles:
    """The image files named by ``inputs`` (folders, list files, image files), in order, with their ids.

    Args:
        inputs: folders, list files (``.txt``/``.lst``/``.list``) and image files, in the order to index them.
        recursive: also walk the subfolders of each folder.
        read_list: reads a list file's lines (the CLI's, which refuses blank lines and handles CRLF and a
            UTF-8 BOM).
        flag: the option that gave ``inputs``, for messages.
    Returns:
        :class:`ImageFiles`. A path that does not exist is kept as an image (it fails, named, when read).
    Raises:
        InputError: no inputs, a ``.npy`` among them, a folder or list without images, or two images with
            the same id.
    """
    if not inputs:
        raise InputError(f"{flag} needs at least one folder, image file or list file")
    extensions = image_extensions()
    files: list[ImageFile] = []
    skipped: list[Path] = []
    for given in inputs:
        path = Path(given)
        if is_features_file(path):
            raise InputError(
                f"{flag} {given}: a .npy file holds region features and is indexed on its own "
                f"({flag} FEATS.npy); do not mix it with image files"
            )
        if path.is_dir():
            found, others, not_entered = _walk(path, recursive, extensions)
            if not found:
                hint = (
                    f"; it has {not_entered} subfolder(s): pass --recursive to index their images"
                    if not_entered
                    else ""
                )
                raise InputError(
                    f"{flag} {given}: no image files in this folder (looked for "
                    f"{', '.join(sorted(e for e in extensions if e in _COMMON))}, ...){hint}"
                )
            files += found
            skipped += others
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            lines = read_list(path)
            # relative to the list's folder; an absolute line stays absolute
            files += [ImageFile(path.parent / line, line) for line in lines]
        else:
            files.append(ImageFile(path, str(given)))
    by_id: dict[str, Path] = {}
    for f in files:
        if f.id in by_id:
            raise InputError(
                f"{flag}: two images get the id {f.id!r} ({by_id[f.id]} and {f.path}); give each folder "
                "once, index their parent folder, or give ids with --ids"
            )
        by_id[f.id] = f.path
    return ImageFiles(files, skipped)


_COMMON = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
