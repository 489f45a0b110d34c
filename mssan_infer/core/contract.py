"""The gallery contract: what two-stage search needs from a store of encoded items.

A *gallery* holds the encoded items of one modality (images searched by captions,
or captions searched by images). Search never touches a gallery directly: it takes
a :class:`GalleryView`, a consistent snapshot, and asks it for the stage-1 top-k and
for the candidates' locals. Every gallery implementation (the in-memory numpy/FAISS
gallery, compressed layouts, external vector stores) honours these two protocols, and
:func:`mssan_infer.core.search.search` is written against them alone.
"""
from __future__ import annotations

import re
from concurrent.futures import Executor
from typing import Any, Iterable, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from .errors import InputError

__all__ = ["ItemId", "check_id", "id_text", "colliding_ids", "raise_colliding", "GalleryView", "Gallery", "extent"]

ItemId = Union[str, int]


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
    """The text form of an id: ``str(id)``. Triton's ``retriever`` returns ids in this form and the CLI prints it;
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
            f"ids {text[:5]} read the same as other ids of another type (7 and '7'): Triton and the CLI give ids "
            "as text, so one gallery cannot hold both; use one type"
        )


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

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: the best rows for each of ``queries [Q, 2D]`` by inner product with the stage-1 vectors.

        Returns:
            ``(rows [Q, k'] int64, scores [Q, k'] float32)``, best first (an exact search breaks
            ties by increasing row); ``k' <= min(k, n)`` (an approximate method may return fewer).
            The scores are float32 inner products with the stored stage-1 vectors, whatever the
            search used to find the rows.
        """
        ...

    def gather(
        self, rows: np.ndarray, executor: Executor | None = None, parts: int = 1
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Locals, masks and Grams of ``rows`` (in that order), float32, trimmed to their longest item.

        Returns: ``local [K, P', D]``, ``mask [K, P']``, ``gram [K, P', P']``.
        """
        ...


@runtime_checkable
class Gallery(Protocol):
    """A mutable store of encoded items of one modality.

    ``add``/``remove`` may run while other threads search views taken earlier: a view never
    changes and never shows half an ``add``.
    """

    stage1_dim: int      # 2D
    local_dim: int       # D

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
    ) -> list[ItemId]:
        """Append encoded items (all or nothing); returns their ids.

        Raises:
            InputError: shapes, NaN/inf, bad, duplicate or already present ids.
        """
        ...

    def remove(self, ids: Iterable[ItemId]) -> None:
        """Remove items by id (all or nothing). Raises InputError for an unknown id."""
        ...

    def view(self) -> GalleryView:
        """A consistent snapshot for one search."""
        ...
