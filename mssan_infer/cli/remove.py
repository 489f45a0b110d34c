"""``python -m mssan_infer remove``: items out of an index folder (atomically) or Qdrant galleries, by id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from mssan_infer.bundle import load_bundle
from mssan_infer.cli.files import ids_to_remove
from mssan_infer.cli.galleries import GalleryArg, open_galleries
from mssan_infer.errors import InputError
from mssan_infer.names import IMAGES, TEXTS

__all__ = ["RemoveSummary", "run_remove"]


@dataclass(frozen=True)
class RemoveSummary:
    """What :func:`run_remove` removed, and what is left."""

    where: str
    images: int
    texts: int
    total_images: int
    total_texts: int

    def line(self) -> str:
        """The one summary line the CLI prints."""
        n = self.images + self.texts
        return (
            f"removed {n} item{'' if n == 1 else 's'} ({self.images} images, {self.texts} captions) from "
            f"{self.where}; it now holds {self.total_images} images and {self.total_texts} captions"
        )


def run_remove(
    bundle: str | os.PathLike[str],
    index: str | os.PathLike[str] | None = None,
    *,
    ids: Sequence[str],
    kind: str | None = None,
    gallery: GalleryArg = None,
) -> RemoveSummary:
    """Remove items by id from an index folder (atomically: the folder is saved once, or left as it was) or
    from Qdrant galleries. Ids are matched by their text (``"7"`` names the item with id ``7``; a gallery
    never holds both). Nothing is encoded, so no graph is loaded and the bundle is read only for its id
    (its files are not hashed; the index records which files the id covers).

    Args:
        ids: the ids, or one ``.txt`` file of ids (one per line).
        kind: ``"images"`` or ``"captions"`` to look only there; by default an id must be in exactly one of
            the two galleries.
    Raises:
        InputError: an id in neither gallery or in both, no ids; nothing is removed then.
        IndexFileError: no index or gallery there.
    """
    wanted = list(dict.fromkeys(ids_to_remove(ids)))
    if not wanted:
        raise InputError("--ids: give the ids to remove, or a .txt file of them")
    if kind not in (None, "images", "captions"):
        raise InputError(f"--from must be images or captions, got {kind!r}")
    b = load_bundle(bundle, verify=False)  # only its id is needed: the index is checked with the id's files
    opened = open_galleries(b, index, gallery)
    place = opened.where
    try:
        names = {"images": [IMAGES], "captions": [TEXTS], None: [IMAGES, TEXTS]}[kind]
        by_text = {n: {str(i): i for i in opened.galleries[n].ids} for n in names}
        unknown = [t for t in wanted if not any(t in m for m in by_text.values())]
        if unknown:
            where = place if kind is None else f"the {kind} of {place}"
            raise InputError(
                f"{len(unknown)} of the {len(wanted)} ids are not in {where}, e.g. {unknown[:3]}; nothing "
                "was removed"
            )
        both = [t for t in wanted if len(names) == 2 and all(t in m for m in by_text.values())]
        if both:
            raise InputError(
                f"ids {both[:3]} are in both the image and the caption gallery; pass --from images or --from "
                "captions; nothing was removed"
            )
        drop = {n: [m[t] for t in wanted if t in m] for n, m in by_text.items()}
        for name, items in drop.items():
            if items:
                opened.galleries[name].remove(items)
        opened.keep()
        return RemoveSummary(
            str(index) if index is not None else place.removeprefix("--gallery "),
            len(drop.get(IMAGES, [])),
            len(drop.get(TEXTS, [])),
            len(opened.galleries[IMAGES]),
            len(opened.galleries[TEXTS]),
        )
    finally:
        opened.close()
