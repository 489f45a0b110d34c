"""The gallery contract: what two-stage search needs from a store of encoded items.

A *gallery* holds the encoded items of one modality (images searched by captions,
or captions searched by images). Search never touches a gallery directly: it takes
a :class:`GalleryView`, a consistent snapshot, and asks it for the stage-1 top-k and
for the candidates' locals. Every gallery implementation (the in-memory numpy/FAISS
gallery, compressed layouts, external vector stores) honours these two protocols, and
:func:`mssan_infer.search.search` is written against them alone.
"""

from __future__ import annotations

import re
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from mssan_infer.errors import InputError
from mssan_infer.gallery.storage import dequantize_into

__all__ = [
    "ItemId",
    "check_id",
    "id_text",
    "colliding_ids",
    "raise_colliding",
    "new_ids",
    "check_encoded",
    "check_labels",
    "ItemRecord",
    "GalleryView",
    "Gallery",
    "extent",
    "Candidates",
]

ItemId = Union[str, int]


@dataclass(frozen=True)
class Candidates:
    """The rerank inputs of ``K`` gallery items, as the scorer reads them.

    Attributes:
        local: ``[K, P, D]`` float32 locals; with ``scale``, the ``int8`` layout's codes as stored
            (uint8, value + 128), never widened on the query path; ``None`` beside ``similarity``.
        scale: ``[K, P]`` float32 per-vector scales of int8 codes, else ``None``.
        mask: ``[K, P]`` float32, 1 for real regions/words.
        gram: ``[K, P, P]`` Grams: float32, or float16 beside int8 codes (as stored).
        similarity: ``[K, P, Q]`` float32 ``local @ query^T``, computed where the rows lie instead of
            copying their locals (``GalleryView.gather(..., query=)``), else ``None``.
    """

    local: np.ndarray | None
    scale: np.ndarray | None
    mask: np.ndarray
    gram: np.ndarray
    similarity: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def dequantized(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 locals and Grams (a copy where stored otherwise): for the all-pairs ``scorer``."""
        local = self.local
        if local is None:
            raise ValueError(
                "candidates gathered as similarities to a query hold no locals; gather them without query="
            )
        if self.scale is not None:
            codes = local
            local = np.empty(codes.shape, np.float32)
            dequantize_into(local, codes, self.scale)
        return np.ascontiguousarray(local, np.float32), np.ascontiguousarray(self.gram, np.float32)


def check_id(x: Any) -> ItemId:
    """``x`` as an item id (``str`` or ``int``; numpy scalars converted).

    Raises:
        InputError: anything else (``bool``, ``float``, ``bytes``, ``None``...).
    """
    if isinstance(x, np.integer):
        x = int(x)
    elif isinstance(x, np.str_):
        x = str(x)
    if isinstance(x, bool) or not isinstance(x, (str, int)):
        raise InputError(f"ids must be str or int (JSON-serialisable), got {type(x).__name__} {x!r}")
    return x


def id_text(x: ItemId) -> str:
    """The text form of an id: ``str(id)``. Triton's ``retriever`` returns ids in this form and the CLI
    prints it;
    it is unique within a gallery (see :func:`colliding_ids`), so it always names one item."""
    return str(x)


_INT_TEXT = re.compile(r"0|-?[1-9][0-9]*")


def _twin(x: ItemId) -> ItemId | None:
    """The id of the other type with the same text form (``7`` <-> ``"7"``), if there is one."""
    if isinstance(x, int):
        return str(x)
    return int(x) if _INT_TEXT.fullmatch(x) else None


def colliding_ids(new: Sequence[ItemId], present: Any) -> tuple[list[ItemId], list[ItemId]]:
    """New ids that clash with ``present`` (a container of ids): ``(already present, same text as another)``.

    An id clashes by text when an id of the other type with the same text form is present or in
    ``new`` too (``7`` and ``"7"``): one gallery never holds two ids that read the same.
    """
    new_set = set(new)
    same = [i for i in new if i in present]
    text = [i for i in new if (t := _twin(i)) is not None and (t in present or t in new_set)]
    return same, text


def raise_colliding(new: Sequence[ItemId], present: Any) -> None:
    """Raise InputError when :func:`colliding_ids` finds any, naming a few."""
    same, text = colliding_ids(new, present)
    if same:
        raise InputError(f"ids already in the gallery: {same[:5]}; remove them first or use other ids")
    if text:
        raise InputError(
            f"ids {text[:5]} read the same as other ids of another type (7 and '7'): Triton and the CLI "
            "give ids "
            "as text, so one gallery cannot hold both; use one type"
        )


def new_ids(ids: Any, n: int, present: Callable[[list[ItemId]], list[ItemId]]) -> list[ItemId]:
    """Checked ids for ``n`` new items.

    Args:
        ids: the caller's ids (a sequence of str/int).
        n: items being added.
        present: returns which of the given ids the gallery already holds (asked once, for the new ids
            and their twins of the other type, see :func:`colliding_ids`).
    Raises:
        InputError: not a sequence, a wrong count, a bad id, duplicates, ids already present, or an id
            that reads the same as a present one of the other type (``7`` and ``"7"``).
    """
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise InputError(f"ids must be a sequence of str/int, got {type(ids).__name__}")
    out = [check_id(i) for i in ids]
    if len(out) != n:
        raise InputError(f"got {len(out)} ids for {n} items")
    if len(set(out)) != n:
        seen: set[ItemId] = set()
        dup = [i for i in out if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
        raise InputError(f"duplicate ids in this batch: {dup[:5]}")
    twins = [t for i in out if (t := _twin(i)) is not None]
    raise_colliding(out, set(present(out + twins)))
    return out


def check_encoded(
    stage1: Any, local: Any, mask: Any, gram: Any, stage1_dim: int, local_dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Encoded items as arrays, checked and trimmed to their longest item.

    Returns: ``stage1 [N, 2D]`` float32, ``local [N, P, D]``, ``mask [N, P]`` float32, ``gram [N, P, P]``.
    Raises:
        InputError: shapes that do not fit each other or the dims, NaN or inf, a mask not of 0/1.
    """
    stage1 = np.asarray(stage1, dtype=np.float32)
    local = np.asarray(local)
    mask = np.asarray(mask, dtype=np.float32)
    gram = np.asarray(gram)
    n = stage1.shape[0] if stage1.ndim == 2 else -1
    if (
        stage1.ndim != 2
        or stage1.shape[1] != stage1_dim
        or local.ndim != 3
        or local.shape[0] != n
        or local.shape[2] != local_dim
        or mask.shape != local.shape[:2]
        or gram.shape != (n, local.shape[1], local.shape[1])
    ):
        raise InputError(
            f"encoded items must be stage1 [N,{stage1_dim}], local [N,P,{local_dim}], mask [N,P], "
            f"gram [N,P,P]; got {stage1.shape}, {local.shape}, {mask.shape}, {gram.shape}"
        )
    if not (np.isfinite(stage1).all() and np.isfinite(local).all() and np.isfinite(gram).all()):
        raise InputError("encoded items contain NaN or inf; check the input features")
    if not np.isin(mask, (0.0, 1.0)).all():
        raise InputError("encoded items' mask must hold only 1 (real position) and 0 (padding)")
    width = extent(mask)
    return stage1, local[:, :width], mask[:, :width], gram[:, :width, :width]


def check_labels(values: Any, n: int, what: str) -> list[str | None]:
    """``values`` for ``n`` new items: ``None`` (none), or ``n`` str or ``None`` each (a caption's text, an
    image's source path).

    Raises:
        InputError: not a sequence of ``n``, or an entry that is neither a str nor None.
    """
    if values is None:
        return [None] * n
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InputError(
            f"{what} must be a list with one str (or None) per item, got {type(values).__name__}"
        )
    out = list(values)
    if len(out) != n:
        raise InputError(f"got {len(out)} {what} for {n} items")
    for i, v in enumerate(out):
        if v is not None and not isinstance(v, str):
            raise InputError(f"{what} {i} must be a str or None, got {type(v).__name__}")
    return out


@dataclass(frozen=True)
class ItemRecord:
    """What a gallery keeps of an item besides its vectors: its id, the caption's text (caption galleries),
    the file an image was indexed from, and the user's metadata (``None`` for each one it does not have)."""

    id: ItemId
    text: str | None = None
    source: str | None = None
    metadata: dict[str, Any] | None = None


def extent(mask: np.ndarray) -> int:
    """Padded width needed by ``mask [N, P]``: one past the last real position of any item (0 if none)."""
    cols = np.flatnonzero((np.asarray(mask) > 0).any(0))
    return int(cols[-1]) + 1 if cols.size else 0


@runtime_checkable
class GalleryView(Protocol):
    """A consistent, read-only snapshot of a gallery, valid while a search runs.

    Rows are the snapshot's own item numbers ``0 .. n-1``; they mean nothing across snapshots.
    """

    @property
    def n(self) -> int:
        """Items in the snapshot."""
        ...

    def ids_at(self, rows: Sequence[int] | np.ndarray) -> list[ItemId]:
        """The ids of ``rows``."""
        ...

    def records_at(self, rows: Sequence[int] | np.ndarray) -> list[ItemRecord]:
        """The ids, texts, sources and metadata of ``rows`` (search asks only for the hits it returns).

        The metadata is the caller's own copy; an empty one reads as ``None``.
        """
        ...

    def topk(
        self, queries: np.ndarray, k: int, where: Mapping[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: the best rows for each of ``queries [Q, 2D]`` by inner product with the stage-1 vectors,
        among the items whose metadata passes ``where`` (all items without it; see :mod:`.filters`).

        Returns:
            ``(rows [Q, k'] int64, scores [Q, k'] float32)``, best first (an exact search breaks
            ties by increasing row); ``k' <= min(k, n)`` (an approximate method may return fewer).
            The scores are float32 inner products with the stored stage-1 vectors, whatever the
            search used to find the rows.
        """
        ...

    def gather(
        self,
        rows: np.ndarray,
        executor: Executor | None = None,
        parts: int = 1,
        *,
        query: np.ndarray | None = None,
    ) -> "Candidates":
        """The rerank inputs of ``rows`` (in that order), as the layout stores them, trimmed to their
        longest item (see :class:`Candidates`). With ``query`` (a query's locals ``[Q, D]``), a view may
        return float32 locals as their ``similarity`` to it instead (one read of the rows, no copy);
        one that does not returns the locals."""
        ...


@runtime_checkable
class Gallery(Protocol):
    """A mutable store of encoded items of one modality.

    ``add``/``remove`` may run while other threads search views taken earlier: a view never
    changes and never shows half an ``add``.
    """

    stage1_dim: int  # 2D
    local_dim: int  # D

    def __len__(self) -> int: ...

    def __contains__(self, item_id: object) -> bool: ...

    @property
    def ids(self) -> list[ItemId]:
        """A copy of the ids, in insertion order."""
        ...

    def next_ids(self, count: int) -> list[int]:
        """``count`` fresh integer ids."""
        ...

    def add(
        self,
        stage1: np.ndarray,
        local: np.ndarray,
        mask: np.ndarray,
        gram: np.ndarray,
        ids: Sequence[ItemId] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        texts: Sequence[str | None] | None = None,
        sources: Sequence[str | None] | None = None,
    ) -> list[ItemId]:
        """Append encoded items (all or nothing) with optional per-item metadata, caption texts and source
        paths (kept with the item and returned with its hits); returns their ids.

        Raises:
            InputError: shapes, NaN/inf, bad, duplicate or already present ids, bad metadata, texts or
                sources.
        """
        ...

    def remove(self, ids: Iterable[ItemId]) -> None:
        """Remove items by id (all or nothing). Raises InputError for an unknown id."""
        ...

    def view(self) -> GalleryView:
        """A consistent snapshot for one search."""
        ...
