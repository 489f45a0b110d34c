"""Metadata filters on galleries: ``search(..., where={"album": "x"})``.

Items may carry metadata (a JSON object per item, given to ``add_images``/``add_texts``).
A filter is a mapping from a metadata key to a condition; an item passes when every
condition holds (AND):

- ``{"album": "x"}``: equality with a ``str``, ``int`` or ``bool``;
- ``{"album": ["x", "y"]}``: the value is one of a non-empty list of ``str`` or of ``int``;
- ``{"year": {"gte": 2000, "lt": 2010}}``: a numeric range (``gt``, ``gte``, ``lt``, ``lte``).

An item without the key does not pass (a filter over a key no item has is an empty result,
not an error); an item whose value is a list passes when one of its elements does. Keys starting with
``mssan_`` are reserved for the galleries' own fields.
:func:`matches` states what a filter means for one item. The in-memory gallery answers a filter from
a :class:`MetaIndex` (per key: rows by value, numeric values with their rows), with no per-item
Python at search time; the Qdrant galleries translate filters into Qdrant payload filters. Both are
tested against :func:`matches`.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import numpy as np

from mssan_infer.errors import InputError

__all__ = ["Condition", "Where", "parse_where", "matches", "MetaIndex", "check_metadata", "RESERVED_PREFIX"]

RESERVED_PREFIX = "mssan_"
RANGE_OPS = ("gt", "gte", "lt", "lte")
Where = Mapping[str, Any]
Scalar = Union[str, int, bool]


@dataclass(frozen=True)
class Condition:
    """One checked condition: ``kind`` is ``"eq"``, ``"in"`` or ``"range"``."""

    key: str
    kind: str
    value: Any  # eq: a scalar; in: a tuple of scalars; range: {op: float}


def _check_key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not key:
        raise InputError(f"{what} keys must be non-empty strings, got {key!r}")
    if key.startswith(RESERVED_PREFIX):
        raise InputError(
            f"{what} key {key!r}: keys starting with {RESERVED_PREFIX!r} are reserved; rename it"
        )
    return key


def _is_number(v: Any) -> bool:
    """A finite int or float (not a bool); an int of any size is finite."""
    return (
        isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v))
    )


def parse_where(where: Where | None) -> tuple[Condition, ...]:
    """Check a filter and return its conditions (empty for ``None`` or ``{}``).

    Raises:
        InputError: a key that is not a str or is reserved, or a condition of another form
            (a float to match exactly, an empty or mixed list, an unknown range operator).
    """
    if where is None:
        return ()
    if not isinstance(where, Mapping):
        raise InputError(f"where must be a mapping of metadata key -> condition, got {type(where).__name__}")
    out: list[Condition] = []
    for key, cond in where.items():
        key = _check_key(key, "where")
        if isinstance(cond, (str, bool)) or (isinstance(cond, int) and not isinstance(cond, bool)):
            out.append(Condition(key, "eq", cond))
        elif isinstance(cond, (list, tuple)):
            values = list(cond)
            if not values or not (
                all(isinstance(v, str) for v in values)
                or all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            ):
                raise InputError(
                    f"where[{key!r}]: a list matches one of its values and must be a non-empty list of str "
                    f"or of int, got {cond!r}"
                )
            out.append(Condition(key, "in", tuple(values)))
        elif isinstance(cond, Mapping):
            bad = [op for op in cond if op not in RANGE_OPS]
            if bad or not cond or not all(_is_number(v) for v in cond.values()):
                raise InputError(
                    f"where[{key!r}]: a range is a mapping of {RANGE_OPS} to finite numbers, got "
                    f"{dict(cond)!r}"
                )
            try:
                bounds = {op: float(v) for op, v in cond.items()}
            except OverflowError:
                raise InputError(
                    f"where[{key!r}]: range bounds must fit a float64, got {dict(cond)!r}"
                ) from None
            out.append(Condition(key, "range", bounds))
        else:
            hint = (
                "; match a float with a range, e.g. {'gte': x, 'lte': x}" if isinstance(cond, float) else ""
            )
            raise InputError(
                f"where[{key!r}] must be a str/int/bool, a list of str or int, or a range mapping, "
                f"got {type(cond).__name__}{hint}"
            )
    return tuple(out)


def _holds(value: Any, c: Condition) -> bool:
    if isinstance(value, list):  # a list value passes when one of its elements does (as in Qdrant)
        return any(_holds(v, c) for v in value)
    if c.kind == "eq":
        # bool is an int in Python; keep True from matching 1, as a JSON payload filter does
        return type(value) is type(c.value) and value == c.value
    if c.kind == "in":
        return any(type(value) is type(v) and value == v for v in c.value)
    if not _is_number(value):
        return False
    r = c.value
    return (
        ("gt" not in r or value > r["gt"])
        and ("gte" not in r or value >= r["gte"])
        and ("lt" not in r or value < r["lt"])
        and ("lte" not in r or value <= r["lte"])
    )


def matches(meta: Mapping[str, Any] | None, conditions: Sequence[Condition]) -> bool:
    """Whether an item's metadata passes every condition (a missing key fails)."""
    if not conditions:
        return True
    if not meta:
        return False
    return all(c.key in meta and _holds(meta[c.key], c) for c in conditions)


_EXACT_FLOAT = 2**53  # ints beyond this are compared in Python (float64 would round them)
_CACHED = 1024  # numpy arrays a MetaIndex keeps for the values and keys filters asked about


def _scalars(value: Any) -> list[Any]:
    """``value``, or the elements of a list value (nested lists flattened), as a filter sees them."""
    if isinstance(value, list):
        return [x for v in value for x in _scalars(v)]
    return [value]


class MetaIndex:
    """The items' metadata indexed for filters: per key, the rows of each scalar value (equality and
    ``in``) and the numeric values with their rows (ranges); a list value contributes each element.

    Items are indexed in order, on the first filtered search that needs them: ``metas`` (a gallery's
    per-item list) may grow at its end, but is never changed in place (a gallery that removes items
    starts a new index; the gallery keeps its own copies of the items' metadata). Safe to share between
    threads.
    """

    def __init__(self, metas: Sequence[Mapping[str, Any] | None]) -> None:
        self._metas = metas
        self._done = 0  # items indexed
        self._lock = threading.Lock()
        self._rows: dict[str, dict[tuple[type, Any], list[int]]] = {}  # key -> (type, value) -> rows
        self._nums: dict[str, tuple[list[float], list[int]]] = {}  # key -> numeric values, their rows
        self._big: dict[str, list[tuple[int, int]]] = {}  # key -> (int beyond 2^53, row)
        self._arrays: dict[Any, Any] = {}  # numpy forms of the lists above, dropped when items are added

    def _index(self, n: int) -> None:
        if self._done < min(n, len(self._metas)):
            self._arrays.clear()  # the cached arrays miss the rows indexed now
        for r in range(self._done, min(n, len(self._metas))):
            self._done = r + 1
            meta = self._metas[r]
            for key, value in (meta or {}).items():
                by_value = self._rows.setdefault(key, {})
                for v in _scalars(value):
                    if isinstance(v, (str, int, float, bool)):
                        by_value.setdefault((type(v), v), []).append(r)
                    if _is_number(v):
                        if isinstance(v, int) and abs(v) > _EXACT_FLOAT:
                            self._big.setdefault(key, []).append((v, r))
                        else:
                            vals, rows = self._nums.setdefault(key, ([], []))
                            vals.append(float(v))
                            rows.append(r)

    def _value_rows(self, key: str, v: Any) -> np.ndarray:
        rows = self._rows.get(key, {}).get((type(v), v))
        if not rows:  # values no item has are not cached: a stream of them would grow the cache
            return np.zeros(0, np.int64)
        cache = ("eq", key, type(v), v)
        if cache not in self._arrays:
            if len(self._arrays) >= _CACHED:
                self._arrays.clear()
            self._arrays[cache] = np.asarray(rows, np.int64)
        return self._arrays[cache]  # type: ignore[no-any-return]

    def _numbers(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        cache = ("num", key)
        if cache not in self._arrays:
            vals, rows = self._nums.get(key, ([], []))
            self._arrays[cache] = (np.asarray(vals, np.float64), np.asarray(rows, np.int64))
        return self._arrays[cache]  # type: ignore[no-any-return]

    def _passing(self, c: Condition) -> np.ndarray:
        """Rows (unsorted, maybe repeated) with a value that satisfies ``c``."""
        if c.kind == "eq":
            return self._value_rows(c.key, c.value)
        if c.kind == "in":
            return np.concatenate([self._value_rows(c.key, v) for v in c.value])
        vals, rows = self._numbers(c.key)
        keep = np.ones(len(vals), bool)
        for op, t in c.value.items():
            keep &= {"gt": vals > t, "gte": vals >= t, "lt": vals < t, "lte": vals <= t}[op]
        big = [r for v, r in self._big.get(c.key, ()) if _holds(v, c)]
        return np.concatenate([rows[keep], np.asarray(big, np.int64)])

    def rows(self, conditions: Sequence[Condition], n: int) -> np.ndarray:
        """The rows ``< n`` whose metadata passes every condition (:func:`matches`), sorted."""
        keep = np.ones(n, bool)
        with self._lock:
            self._index(n)
            for c in conditions:
                rows = self._passing(c)
                passing = np.zeros(max(n, int(rows.max()) + 1 if len(rows) else 0), bool)
                passing[rows] = True
                keep &= passing[:n]
        return np.flatnonzero(keep).astype(np.int64)


def check_metadata(metadata: Any, n: int) -> list[dict[str, Any] | None]:
    """``metadata`` for ``n`` new items: ``None`` or a list of ``n`` JSON objects (or ``None`` each).

    Raises:
        InputError: not a list of ``n``, an item that is not a mapping, a reserved or non-str key,
            or a value that JSON cannot hold (NaN, inf, objects).
    """
    if metadata is None:
        return [None] * n
    if isinstance(metadata, Mapping) or isinstance(metadata, (str, bytes)):
        raise InputError("metadata must be a list with one mapping (or None) per item, not a single mapping")
    try:
        items = list(metadata)
    except TypeError:
        raise InputError(f"metadata must be a list of mappings, got {type(metadata).__name__}") from None
    if len(items) != n:
        raise InputError(f"got {len(items)} metadata entries for {n} items")
    out: list[dict[str, Any] | None] = []
    for i, m in enumerate(items):
        if m is None:
            out.append(None)
            continue
        if not isinstance(m, Mapping):
            raise InputError(f"metadata {i} must be a mapping (or None), got {type(m).__name__}")
        clean = {_check_key(k, f"metadata {i}"): v for k, v in m.items()}
        try:
            text = json.dumps(clean, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InputError(
                f"metadata {i} must hold JSON values only (no NaN/inf or objects): {e}"
            ) from None
        out.append(json.loads(text))  # the gallery's own copy: a caller's later edits do not reach it
    return out
