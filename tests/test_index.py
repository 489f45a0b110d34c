"""Gallery store: top-k, padding, append, remove, snapshots, atomic save/load with checksums (numpy only)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from mssan_infer import GalleryOptions, Layout, Stage1Options
from mssan_infer.errors import IndexFileError, InputError
from mssan_infer.gallery.folder import load_index, save_index
from mssan_infer.gallery.memory import MemoryGallery
from mssan_infer.gallery.stage1 import topk_inner_product
from mssan_infer.names import INDEX_FORMAT_VERSION, INDEX_MANIFEST

D = 8


def items(n: int, length: int | list[int], seed: int = 0) -> tuple[np.ndarray, ...]:
    """Random encoded items shaped like encoder output, padded to the longest length."""
    rng = np.random.default_rng(seed)
    lengths = [length] * n if isinstance(length, int) else list(length)
    p = max(lengths)
    stage1 = rng.normal(size=(n, 2 * D)).astype(np.float32)
    local = rng.normal(size=(n, p, D)).astype(np.float32)
    mask = np.zeros((n, p), np.float32)
    for i, ln in enumerate(lengths):
        mask[i, :ln] = 1
    local *= mask[..., None]
    gram = local @ local.transpose(0, 2, 1)
    return stage1, local, mask, gram


def full(g: MemoryGallery) -> tuple[np.ndarray, ...]:
    return g.view().arrays()


# ---- top-k ---------------------------------------------------------------------
@pytest.mark.parametrize("chunk_bytes", [64 << 20, 600])
def test_topk_matches_full_sort_in_one_or_many_blocks(chunk_bytes: int) -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(500, 16)).astype(np.float32)
    q = rng.normal(size=(7, 16)).astype(np.float32)
    idx, scores = topk_inner_product(q, base, 20, chunk_bytes=chunk_bytes)
    ref = np.argsort(-(q @ base.T), axis=1)[:, :20]
    assert np.array_equal(idx, ref)
    assert np.allclose(scores, np.take_along_axis(q @ base.T, ref, axis=1), atol=1e-5)


def test_topk_clips_k_to_gallery_size_and_breaks_ties_by_row() -> None:
    base = np.ones((3, 4), np.float32)
    idx, scores = topk_inner_product(np.ones((1, 4), np.float32), base, 10)
    assert idx.tolist() == [[0, 1, 2]] and scores.shape == (1, 3)


def test_faiss_ivf_probing_every_list_returns_numpy_stage1_topk_and_follows_appends() -> None:
    import faiss  # noqa: F401  (dev extra: a missing faiss fails, never skips)

    st, lo, ma, gr = items(300, 3, seed=2)
    a, b = (
        MemoryGallery(2 * D, D),
        MemoryGallery(2 * D, D, GalleryOptions(stage1=Stage1Options(method="faiss-ivf", nlist=4, nprobe=4))),
    )
    a.add(st, lo, ma, gr)
    b.add(st, lo, ma, gr)
    q = np.random.default_rng(3).normal(size=(5, 2 * D)).astype(np.float32)
    ia, sa = a.view().topk(q, 15)
    ib, sb = b.view().topk(q, 15)
    assert np.array_equal(ia, ib)
    assert np.allclose(sa, sb, atol=1e-4)
    b.add(*items(10, 3, seed=9))  # the FAISS index follows appends
    assert b.view().topk(q, 400)[0].shape == (5, 310)


@pytest.mark.parametrize("options, min_overlap", [({}, 0.6), ({"nlist": 8, "nprobe": 8}, 1.0)])
def test_faiss_ivf_finds_most_exact_neighbours_and_all_when_probing_every_list(
    options: dict[str, int], min_overlap: float
) -> None:
    import faiss  # noqa: F401  (dev extra: a missing faiss fails, never skips)

    st, lo, ma, gr = items(800, 2, seed=6)
    exact, ivf = (
        MemoryGallery(2 * D, D),
        MemoryGallery(2 * D, D, GalleryOptions(stage1=Stage1Options(method="faiss-ivf", **options))),
    )
    exact.add(st, lo, ma, gr)
    ivf.add(st, lo, ma, gr)
    q = np.random.default_rng(7).normal(size=(10, 2 * D)).astype(np.float32)
    (ie, _), (ii, si) = exact.view().topk(q, 10), ivf.view().topk(q, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ie, ii)])
    assert overlap >= min_overlap
    idx = ivf.view().faiss_index
    assert idx.nlist == options.get("nlist", 20) and idx.nprobe == options.get("nprobe", 16)
    # the scores of what IVF finds are exact inner products
    assert np.allclose(si, np.einsum("qd,qkd->qk", q, st[ii]), atol=1e-4)


# ---- storage ---------------------------------------------------------------------
def test_items_of_different_lengths_are_padded_to_the_longest_with_masks() -> None:
    g = MemoryGallery(2 * D, D)
    first = items(3, [2, 3, 1], seed=0)
    g.add(*first, ids=["a", "b", "c"])
    assert g.max_length == 3
    second = items(2, [5, 4], seed=1)
    g.add(*second, ids=["d", "e"])
    assert g.max_length == 5
    st, lo, ma, gr = full(g)
    assert ma.sum(1).tolist() == [2, 3, 1, 5, 4]
    assert np.array_equal(lo[:3, :3], first[1]) and not lo[:3, 3:].any()
    assert np.array_equal(gr[:3, :3, :3], first[3]) and not gr[:3, 3:].any()
    assert np.array_equal(st, np.concatenate([first[0], second[0]]))
    rows = np.array([4, 0])
    c = g.view().gather(rows)
    local, mask = c.local, c.mask
    assert local.shape == (2, 4, D)  # trimmed to the longest of the gathered items
    assert mask.sum(1).tolist() == [4, 2]


def test_gather_keeps_real_positions_after_a_masked_gap() -> None:
    st, lo, ma, gr = items(2, 4, seed=3)
    ma[0, 3] = 0
    ma[1, 1:3] = 0  # gap in the middle: width must stay 4
    g = MemoryGallery(2 * D, D)
    g.add(st, lo, ma, gr)
    c = g.view().gather(np.array([1]))
    local, mask = c.local, c.mask
    assert local.shape[1] == 4 and mask[0].tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize(
    "dtype, mmap",
    [
        ("float32", False),
        ("int8", False),
        ("float32", True),
        ("int8", True),
    ],
)
@pytest.mark.parametrize("lengths", [[6] * 70, [2, 6, 3, 4] * 17 + [1, 5]], ids=["full-width", "trimmed"])
@pytest.mark.parametrize("segments", [False, True], ids=["one-block", "segments"])
def test_gather_split_over_threads_equals_one_thread(
    tmp_path: Path, dtype: str, mmap: bool, lengths: list[int], segments: bool
) -> None:
    """One gather, or one split over threads, gives each row's stored values: from one block, or from
    segments of different widths (added in batches whose longest items differ)."""
    from concurrent.futures import ThreadPoolExecutor

    st, lo, ma, gr = items(len(lengths), lengths, seed=5)
    g = MemoryGallery(
        2 * D,
        D,
        GalleryOptions(
            layout=(Layout("float32", dtype) if dtype else None), mmap=mmap, spill_dir=tmp_path / "spill"
        ),
        segment_rows=16,
    )
    if segments:  # shortest items first: segments widen as longer batches arrive
        order = np.argsort(lengths, kind="stable")
        st, lo, ma, gr = st[order], lo[order], ma[order], gr[order]
        lengths = [lengths[i] for i in order]
        cuts = [0, 16, 20, 37, 52, len(lengths)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            w = max(lengths[a:b])  # each batch padded to its own longest item
            g.add(st[a:b], lo[a:b, :w], ma[a:b, :w], gr[a:b, :w, :w])
        assert len(g.view().blocks) >= 4
    else:
        g.add(st, lo, ma, gr)
        assert len(g.view().blocks) == 1
    rows = np.random.default_rng(0).permutation(len(lengths))[:50]
    rows[:5] = rows[0]  # repeated rows are fine
    view = g.view()
    one = view.gather(rows)
    stored = {"float32": np.float32, "int8": np.uint8}[dtype]
    assert one.local.dtype == stored and (one.scale is not None) == (dtype == "int8")
    with ThreadPoolExecutor(3) as pool:
        for parts in (2, 3, 4, 99):
            split = view.gather(rows, pool, parts)
            for a, b in ((one.local, split.local), (one.scale, split.scale), (one.mask, split.mask)):
                assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))
            assert np.array_equal(one.gram, split.gram)
    for bad in (np.array([0, -1]), np.array([len(lengths)])):  # never padding read as data
        with pytest.raises(InputError, match="gallery rows must lie in"):
            view.gather(bad)
    by_row = np.argsort(rows, kind="stable")  # rows in order (grouped by block): taken straight into place
    ordered = view.gather(rows[by_row])
    for a, b in ((one.local, ordered.local), (one.scale, ordered.scale), (one.gram, ordered.gram)):
        assert (a is None and b is None) or np.array_equal(a[by_row], b)
    width = max(lengths[r] for r in rows)
    local, gram = one.dequantized()
    tol = {"float32": 0, "int8": 1e-2}[dtype]
    np.testing.assert_allclose(local, lo[rows, :width], atol=tol * np.abs(lo).max())
    np.testing.assert_allclose(gram, gr[rows, :width, :width], atol=tol * np.abs(gr).max())
    assert np.array_equal(one.mask, ma[rows, :width])


def test_default_ids_count_up_from_the_largest_int_id() -> None:
    g = MemoryGallery(2 * D, D)
    assert g.add(*items(2, 2)) == [0, 1]
    g.add(*items(1, 2, seed=1), ids=["x"])
    assert g.add(*items(2, 2, seed=2)) == [2, 3]
    assert g.ids == [0, 1, "x", 2, 3]


@pytest.mark.parametrize(
    "ids, match",
    [
        (["a", "a"], "duplicate"),
        (["a", 0], "already"),
        ([True, "z"], "str or int"),
        ([1.5, "z"], "str or int"),
        (["z"], "ids for"),
    ],
)
def test_bad_or_colliding_ids_are_refused_and_nothing_is_added(ids: list[object], match: str) -> None:
    g = MemoryGallery(2 * D, D)
    g.add(*items(2, 2), ids=["a", 0])
    with pytest.raises(InputError, match=match):
        g.add(*items(2, 2, seed=1), ids=ids)  # type: ignore[arg-type]
    assert len(g) == 2


def test_wrong_shapes_and_nan_are_refused() -> None:
    g = MemoryGallery(2 * D, D)
    st, lo, ma, gr = items(2, 3)
    with pytest.raises(InputError, match="stage1"):
        g.add(st[:, :D], lo, ma, gr)
    with pytest.raises(InputError):
        g.add(st, lo[..., :-1], ma, gr)
    lo[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        g.add(st, lo, ma, gr)
    assert len(g) == 0


def test_remove_is_all_or_nothing_and_keeps_the_rest_in_order() -> None:
    g = MemoryGallery(2 * D, D)
    st, lo, ma, gr = items(5, [1, 2, 3, 2, 1])
    g.add(st, lo, ma, gr, ids=["a", "b", "c", "d", "e"])
    with pytest.raises(InputError, match="unknown"):
        g.remove(["b", "zz"])
    assert len(g) == 5
    g.remove(["b", "d"])
    assert g.ids == ["a", "c", "e"] and g.position("e") == 2
    s2, l2, m2, _ = full(g)
    assert np.array_equal(s2, st[[0, 2, 4]]) and np.array_equal(l2, lo[[0, 2, 4]])
    with pytest.raises(InputError):
        g.position("b")


def test_a_view_is_unchanged_by_later_adds_and_removes() -> None:
    g = MemoryGallery(2 * D, D)
    g.add(*items(4, 2), ids=[0, 1, 2, 3])
    v = g.view()
    before = v.arrays()[1], list(v.ids[: v.n])
    g.add(*items(3, 6, seed=1))  # grows the padding: new buffers
    g.remove([0, 2])
    assert np.array_equal(v.arrays()[1], before[0]) and list(v.ids[: v.n]) == before[1]


def test_a_search_takes_the_same_view_until_the_gallery_changes() -> None:
    """``view()`` hands out its last snapshot (read-only) until an add, a remove or an adopt; then a new
    one that holds the change."""
    for opts in (GalleryOptions(), GalleryOptions(layout=Layout("int8", "int8"))):
        g = MemoryGallery(2 * D, D, opts)
        g.add(*items(4, 2), ids=[0, 1, 2, 3])
        v = g.view()
        assert g.view() is v
        g.add(*items(2, 3, seed=1), ids=[4, 5])
        v2 = g.view()
        assert v2 is not v and v2.n == 6 and v.n == 4 and g.view() is v2
        g.remove([0])
        v3 = g.view()
        assert v3 is not v2 and v3.n == 5 and list(v3.ids[: v3.n]) == [1, 2, 3, 4, 5]
    empty = MemoryGallery(2 * D, D)
    assert empty.view().n == 0
    empty.adopt(list(full(g)), ids=list(g.ids))
    assert empty.view().n == 5 and list(empty.view().ids[:5]) == [1, 2, 3, 4, 5]


def test_concurrent_adds_from_threads_lose_nothing() -> None:
    g = MemoryGallery(2 * D, D)

    def worker(t: int) -> None:
        for j in range(10):
            g.add(*items(2, 1 + (j % 3), seed=t * 100 + j), ids=[f"{t}-{j}-0", f"{t}-{j}-1"])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(g) == 80 and len(set(g.ids)) == 80
    v = g.view()
    assert all(v.ids[g.position(i)] == i for i in g.ids)


# ---- memory-mapped / int8 locals ---------------------------------------------------
def test_memmapped_int8_locals_gallery_lives_in_spill_files_and_matches_fp32(tmp_path: Path) -> None:
    g = MemoryGallery(
        2 * D, D, GalleryOptions(layout=Layout("float32", "int8"), mmap=True, spill_dir=tmp_path / "spill")
    )
    ref = MemoryGallery(2 * D, D)
    for seed in range(3):
        batch = items(20, 2 + seed, seed=seed)
        g.add(*batch)
        ref.add(*batch)
    v = g.view()
    local = v.blocks[0].local
    assert isinstance(local.base, np.memmap) or isinstance(local, np.memmap)
    assert local.dtype == np.uint8
    for name in ("stage1", "local", "scale", "mask", "gram"):  # spill files are unlinked once mapped (POSIX)
        arr = getattr(v.blocks[0], name)
        mapped = arr if isinstance(arr, np.memmap) else arr.base
        assert isinstance(mapped, np.memmap) and Path(mapped.filename).parent == tmp_path / "spill"
    for a, b in zip(full(g), full(ref)):
        assert np.allclose(a, b, atol=1e-2 * max(1.0, float(np.abs(b).max())))


# ---- save / load --------------------------------------------------------------------
def saved(tmp_path: Path, dtype: str = "float32") -> tuple[Path, MemoryGallery]:
    g = MemoryGallery(2 * D, D, GalleryOptions(layout=(Layout("float32", dtype) if dtype else None)))
    g.add(*items(6, [1, 2, 3, 4, 2, 1]), ids=["a", "b", 7, "d", 9, "f"])
    t = MemoryGallery(2 * D, D, GalleryOptions(layout=(Layout("float32", dtype) if dtype else None)))
    t.add(*items(2, 3, seed=1))
    return save_index(tmp_path / "idx", {"images": g, "texts": t}, bundle_id="b1"), g


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_save_load_round_trip_restores_arrays_and_ids(tmp_path: Path, mmap: bool, dtype: str) -> None:
    path, g = saved(tmp_path, dtype)
    galleries, manifest = load_index(path, bundle_id="b1", options=GalleryOptions(mmap=mmap))
    h = galleries["images"]
    assert manifest["format_version"] == INDEX_FORMAT_VERSION and len(galleries["texts"]) == 2
    assert h.ids == ["a", "b", 7, "d", 9, "f"] and h.dtype == np.dtype(dtype)
    for a, b in zip(full(g), full(h)):
        assert np.array_equal(a, b)
    h.add(*items(1, 8, seed=5), ids=["new"])  # append without re-encoding the rest
    h.remove(["a"])
    assert h.ids[-1] == "new" and h.max_length == 8
    assert np.array_equal(full(h)[1][:5, :4], full(g)[1][1:, :4])


def test_load_refuses_a_tampered_or_truncated_file(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    f = path / "images_local.npy"
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IndexFileError, match="sha256"):
        load_index(path)
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFileError, match="sha256"):
        load_index(path)
    f.unlink()
    with pytest.raises(IndexFileError, match="missing"):
        load_index(path)


def test_load_refuses_another_bundle_and_a_newer_format(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    with pytest.raises(IndexFileError, match="another bundle|built with bundle"):
        load_index(path, bundle_id="other")
    m = json.loads((path / INDEX_MANIFEST).read_text())
    m["format_version"] = INDEX_FORMAT_VERSION + 1
    (path / INDEX_MANIFEST).write_text(json.dumps(m))
    with pytest.raises(IndexFileError, match="newer"):
        load_index(path, bundle_id="b1")


def test_load_refuses_manifest_paths_outside_the_folder(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    m = json.loads((path / INDEX_MANIFEST).read_text())
    m["files"]["../evil.npy"] = "0" * 64
    (path / INDEX_MANIFEST).write_text(json.dumps(m))
    with pytest.raises(IndexFileError, match="unsafe"):
        load_index(path)


def test_save_is_atomic_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, g = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    g.add(*items(1, 2, seed=7), ids=["late"])

    def boom(*a: object, **k: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr("mssan_infer.gallery.folder.sha256_file", boom)
    with pytest.raises(OSError):
        save_index(path, {"images": g}, bundle_id="b1")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp folder left behind


def test_save_never_overwrites_a_folder_that_is_not_an_index(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    g = MemoryGallery(2 * D, D)
    with pytest.raises(IndexFileError, match="not an mssan index"):
        save_index(precious, {"images": g}, bundle_id="b1")
    assert (precious / "notes.txt").read_text() == "keep me"


def test_saved_arrays_load_without_pickle(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    for f in path.glob("*.npy"):
        np.load(f, allow_pickle=False)
    assert json.loads((path / "images_ids.json").read_text()) == ["a", "b", 7, "d", 9, "f"]


@pytest.mark.parametrize("layout", ["fp32", "int8-stage1", "int8"])
@pytest.mark.parametrize("mmap", [False, True])
def test_gather_with_a_query_gives_the_similarities_of_the_stored_locals(
    tmp_path: Path, layout: str, mmap: bool
) -> None:
    """What the float32 query scorers take: ``local @ query^T`` per row, read where the row lies (segments of
    different widths, RAM or mapped, repeated rows, split over threads), the same Grams and masks as a
    plain gather; the int8 layout gives its codes as stored whatever the query."""
    from concurrent.futures import ThreadPoolExecutor

    g = MemoryGallery(2 * D, D, GalleryOptions(layout=layout, mmap=mmap, spill_dir=tmp_path / "spill"))
    g.add(*items(40, [2, 3, 1, 3] * 10, seed=0))
    g.add(*items(30, [5, 4, 1] * 10, seed=1))  # a second segment, wider
    query = np.random.default_rng(2).normal(size=(7, D)).astype(np.float32)
    rows = np.array([3, 45, 0, 69, 12, 50, 50, 1])
    view = g.view()
    plain = view.gather(rows)
    got = view.gather(rows, query=query)
    if layout == "int8":
        assert got.similarity is None and got.local is not None and got.local.dtype == np.uint8
        assert np.array_equal(got.local, plain.local)
        return
    assert got.local is None and got.similarity is not None and plain.local is not None
    assert got.similarity.shape == (len(rows), plain.local.shape[1], 7) and got.similarity.dtype == np.float32
    np.testing.assert_allclose(got.similarity, plain.local @ query.T, rtol=1e-5, atol=1e-5)
    assert not got.similarity[plain.mask == 0].any()  # padded positions: exactly 0, as the locals
    assert np.array_equal(got.gram, plain.gram) and np.array_equal(got.mask, plain.mask)
    many = np.random.default_rng(3).integers(0, 70, 64)  # rows repeated, in any order, both segments
    with ThreadPoolExecutor(2) as pool:  # the products split over threads (64 rows: 4 parts)
        both = view.gather(many, pool, 4, query=query)
    ref = view.gather(many)
    assert both.similarity is not None and ref.local is not None
    np.testing.assert_allclose(both.similarity, ref.local @ query.T, rtol=1e-5, atol=1e-5)
    consecutive = view.gather(np.arange(40, 48), query=query)  # no shortcut past the product
    assert consecutive.similarity is not None
    with pytest.raises(ValueError, match="without query"):
        got.dequantized()
