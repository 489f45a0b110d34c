"""Gallery layouts: compressed stage 1 rescored exactly, int8 locals, memory while adding, saved layouts."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mssan_infer import GalleryOptions, Retriever, Stage1Options
from mssan_infer.errors import IndexFileError, InputError
from mssan_infer.files import sha256_file
from mssan_infer.gallery.folder import load_index, save_index
from mssan_infer.gallery.memory import MemoryGallery
from mssan_infer.gallery.storage import LAYOUTS, Stage1Codec, quantize_vectors

D = 16
ROOT = Path(__file__).resolve().parents[1]


def items(n: int, length: int = 5, seed: int = 0, scale: float = 1.0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    stage1 = (scale * rng.normal(size=(n, 2 * D))).astype(np.float32)
    local = rng.normal(size=(n, length, D)).astype(np.float32)
    local /= np.linalg.norm(local, axis=2, keepdims=True)
    mask = np.ones((n, length), np.float32)
    return stage1, local, mask, local @ local.transpose(0, 2, 1)


def queries(n: int = 6, seed: int = 99) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 2 * D)).astype(np.float32)


def filled(layout: str, batches: int = 3, n: int = 400, **kw: Any) -> MemoryGallery:
    seg = {k: kw.pop(k) for k in ("segment_rows",) if k in kw}
    s1 = {k: kw.pop(k) for k in ("overfetch", "certify") if k in kw}
    g = MemoryGallery(2 * D, D, GalleryOptions(layout=layout, stage1=Stage1Options(**s1), **kw), **seg)
    for seed in range(batches):
        g.add(*items(n, seed=seed))
    return g


# ---- compressed stage 1 -------------------------------------------------------------
@pytest.mark.parametrize("layout", ["int8-stage1", "int8"])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_compressed_stage1_returns_the_exact_topk_with_float32_scores(layout: str, k: int) -> None:
    exact, comp = filled("fp32", segment_rows=256), filled(layout, segment_rows=256)
    q = queries()
    ri, rs = exact.view().topk(q, k)
    ci, cs = comp.view().topk(q, k)
    assert np.array_equal(ci, ri)
    np.testing.assert_allclose(cs, rs, rtol=0, atol=1e-5)  # float32 dot products, other summation order
    assert cs.dtype == np.float32


@pytest.mark.parametrize("layout", ["int8-stage1", "int8"])
def test_certified_stage1_is_exact_even_when_compressed_scores_tie(layout: str) -> None:
    # 600 near-copies of one vector: compressed scores tie, so over-fetching alone cannot find the top k;
    # the error bound makes the search fetch more until no unfetched item can beat the k-th
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1, 2 * D)).astype(np.float32)
    st = (base + 1e-4 * rng.normal(size=(600, 2 * D))).astype(np.float32)
    _, lo, ma, gr = items(600)
    exact = MemoryGallery(2 * D, D)
    comp = MemoryGallery(
        2 * D, D, GalleryOptions(layout=layout, stage1=Stage1Options(overfetch=1, certify=True))
    )
    for g in (exact, comp):
        g.add(st, lo, ma, gr)
    q = queries(3)
    assert np.array_equal(comp.view().topk(q, 5)[0], exact.view().topk(q, 5)[0])


def test_stage1_error_bound_holds_for_every_item() -> None:
    st = items(500, seed=4)[0]
    q = queries(8)
    codec = Stage1Codec("int8", 2 * D)
    codes, outl = codec.encode(st)
    assert not outl.any()
    qq, factor = codec.query(q)
    approx = (qq.astype(np.float64) @ codes.astype(np.float64).T) * factor[:, None]  # what FAISS computes
    err = np.abs(approx - q.astype(np.float64) @ st.astype(np.float64).T)
    assert (err.max(axis=1) <= codec.bound(q)).all()


def test_items_past_the_int8_range_are_kept_exact_then_requantized() -> None:
    exact = MemoryGallery(2 * D, D)
    comp = MemoryGallery(2 * D, D, GalleryOptions(layout="int8-stage1"))
    small, big = items(20, seed=1, scale=0.1), items(60, seed=2, scale=3.0)
    for g in (exact, comp):
        g.add(*small)  # the scales are fitted on this first batch
        g.add(*big)  # every one of these is past their range
    assert len(comp.outliers) == 60
    q = queries()
    assert np.array_equal(comp.view().topk(q, 10)[0], exact.view().topk(q, 10)[0])
    for g in (exact, comp):
        g.add(*items(300, seed=3, scale=3.0))  # outliers pass 1/16 of the gallery: scales refitted
    assert len(comp.outliers) == 0
    assert np.array_equal(comp.view().topk(q, 10)[0], exact.view().topk(q, 10)[0])


@pytest.mark.parametrize("layout", ["int8-stage1", "int8"])
def test_a_saved_index_refits_the_int8_scales_so_it_keeps_no_outliers(tmp_path: Path, layout: str) -> None:
    """A gallery filled by adds keeps items past its first scales exact (rescored on every query); the
    index it saves is encoded on scales fitted on every item: no outliers, the same results, the gallery
    in memory unchanged."""
    exact = MemoryGallery(2 * D, D)
    comp = MemoryGallery(2 * D, D, GalleryOptions(layout=layout))
    small, big = items(40, seed=1, scale=0.1), items(30, seed=2, scale=3.0)
    for g in (exact, comp):
        g.add(*small)  # the scales are fitted on this first batch
        g.add(*big)  # past their range, and too few to refit: outliers
    assert len(comp.outliers) == 30
    before = comp.view().searcher
    path = save_index(tmp_path / "idx", {"images": comp}, bundle_id="b")
    assert len(comp.outliers) == 30 and comp.view().searcher is before  # saving changed nothing in memory
    assert len(np.load(path / "images_stage1_outliers.npy")) == 0
    h = load_index(path, bundle_id="b")[0]["images"]
    assert len(h.outliers) == 0 and h.codec is not None and h.codec.sigma is not None
    st = np.concatenate([small[0], big[0]])
    assert np.allclose(h.codec.sigma, np.abs(st).max(axis=0) / 127)  # fitted on every item
    codes = np.load(path / "images_stage1_codes.npy")
    assert np.array_equal(codes, h.codec.encode(st)[0])
    q = queries()
    for k in (5, 10, 70):
        assert np.array_equal(h.view().topk(q, k)[0], exact.view().topk(q, k)[0])
        assert np.allclose(h.view().topk(q, k)[1], exact.view().topk(q, k)[1], atol=1e-5)


def test_a_gallery_scanned_in_groups_of_sub_indexes_saves_its_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gallery filled by adds whose code sub-indexes are scanned in groups (a thread per group) saves
    and loads: the groups are not saved as codes (saving it raised AttributeError before)."""
    import functools

    import mssan_infer.gallery.memory as memory
    from mssan_infer.gallery.stage1 import code_searcher

    monkeypatch.setattr(memory, "code_searcher", functools.partial(code_searcher, threads=2, min_bytes=1))
    monkeypatch.setattr(memory, "CODE_ROWS", 16)  # several sub-indexes per group
    g = MemoryGallery(2 * D, D, GalleryOptions(layout="int8"), segment_rows=32)
    batches = [items(20, seed=s, scale=3.0 if s == 0 else 1.0) for s in range(6)]  # the first spans the rest
    for b in batches:
        g.add(*b)
    assert len(g.outliers) == 0  # its codes are saved as they are
    codes = g.view().searcher
    assert codes is not None and len(codes.keep) > len(codes.subs) > 2  # groups kept beside the subs
    path = save_index(tmp_path / "idx", {"images": g}, bundle_id="b")
    h = load_index(path, bundle_id="b")[0]["images"]
    st = np.concatenate([b[0] for b in batches])
    assert np.array_equal(np.load(path / "images_stage1_codes.npy"), h.codec.encode(st)[0])
    q = queries()
    assert np.array_equal(h.view().topk(q, 10)[0], g.view().topk(q, 10)[0])


def test_a_compressed_layout_without_faiss_names_the_package(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['faiss'] = None\n"
        "from mssan_infer.gallery.memory import MemoryGallery\n"
        "from mssan_infer.errors import BackendUnavailableError\n"
        "from mssan_infer.options import GalleryOptions\n"
        "MemoryGallery(4, 2)\n"
        "try:\n    MemoryGallery(4, 2, GalleryOptions(layout='int8'))\n"
        "except BackendUnavailableError as e:\n    print('faiss' in str(e) and 'pip install' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# ---- int8 locals ----------------------------------------------------------------------
def test_int8_locals_are_within_half_a_step_of_float32() -> None:
    _, lo, _, _ = items(50, seed=5)
    codes, scale = quantize_vectors(lo)
    assert codes.dtype == np.uint8 and scale.shape == lo.shape[:2]  # stored + 128
    assert codes.min() >= 1 and codes.max() <= 255
    deq = (codes.astype(np.float32) - 128) * scale[..., None]
    assert (np.abs(deq - lo) <= scale[..., None] / 2 + 1e-7).all()


def test_int8_gallery_gathers_the_stored_codes_scales_and_grams() -> None:
    st, lo, ma, gr = items(300, seed=6)
    g = MemoryGallery(2 * D, D, GalleryOptions(layout="int8"))
    g.add(st, lo, ma, gr)
    for rows in (np.array([7, 299, 0, 7]), np.arange(5, 9)):  # copied, and a run of consecutive rows
        c = g.view().gather(rows)
        # as stored: uint8 codes, float32 scales, float16 Grams -- never widened on the query path
        assert c.local.dtype == np.uint8 and c.scale is not None and c.gram.dtype == np.float16
        local, gram = c.dequantized()
        step = np.abs(lo[rows]).max(axis=2, keepdims=True) / 127
        assert (np.abs(local - lo[rows]) <= step / 2 + 1e-7).all()
        # the Grams are those of the dequantized locals (float16), so the scorer scores the dequantized item
        np.testing.assert_allclose(gram, local @ local.transpose(0, 2, 1), atol=2e-3)
        assert np.array_equal(c.mask, ma[rows])


# ---- memory ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["fp32", "int8"])
def test_adding_never_copies_the_items_already_stored(layout: str) -> None:
    g = MemoryGallery(2 * D, D, GalleryOptions(layout=layout), segment_rows=512)
    for seed in range(8):
        g.add(*items(500, seed=seed))
    before = g.view()
    stored = sum(int(a.nbytes) for b in before.blocks for a in (b.stage1, b.local, b.mask, b.gram))
    batch = items(100, seed=50)
    tracemalloc.start()
    try:
        g.add(*batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    after = g.view()
    for old, new in zip(before.blocks, after.blocks):  # every stored block is still the same memory
        assert np.shares_memory(old.local, new.local) and np.shares_memory(old.stage1, new.stage1)
    batch_bytes = sum(int(a.nbytes) for a in batch)
    segment_bytes = 512 * (stored // g.view().n + 1)
    assert peak < 4 * batch_bytes + 2 * segment_bytes < stored  # never a second copy of the gallery


def test_remove_rewrites_only_the_segments_it_touches() -> None:
    g = MemoryGallery(2 * D, D, segment_rows=100)
    for a in range(0, 300, 100):
        g.add(*items(100, seed=a), ids=list(range(a, a + 100)))
    before = g.view()
    g.remove([150, 151])
    after = g.view()
    assert np.shares_memory(before.blocks[0].local, after.blocks[0].local)
    assert not np.shares_memory(before.blocks[1].local, after.blocks[1].local)
    assert np.shares_memory(before.blocks[2].local, after.blocks[2].local)
    assert g.ids == [i for i in range(300) if i not in (150, 151)] and g.position(152) == 150


# ---- saved layouts ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mmap", [False, True])
def test_each_layout_saves_and_loads_with_its_scales_hashed(tmp_path: Path, layout: str, mmap: bool) -> None:
    g = filled(layout, batches=2, n=150)
    path = save_index(tmp_path / "idx", {"images": g}, bundle_id="b")
    manifest = json.loads((path / "index.json").read_text())
    entry = manifest["galleries"]["images"]
    assert entry["layout"]["name"] == layout
    for key, fname in entry["files"].items():
        assert fname in manifest["files"], key  # every file, scales included, is hashed
    if layout == "int8":
        assert {"local_scale", "stage1_scale", "stage1_codes"} <= set(entry["files"])
    h = load_index(path, bundle_id="b", options=GalleryOptions(mmap=mmap))[0]["images"]
    assert h.layout == g.layout
    for a, b in zip(g.view().arrays(), h.view().arrays()):
        assert np.array_equal(a, b)
    q = queries()
    assert np.array_equal(h.view().topk(q, 10)[0], g.view().topk(q, 10)[0])
    h.add(*items(5, seed=77))  # loaded galleries grow in new segments
    assert len(h) == 305


def test_a_float32_index_converts_to_a_compressed_layout_on_load(tmp_path: Path) -> None:
    g = filled("fp32", batches=2, n=150)
    path = save_index(tmp_path / "idx", {"images": g}, bundle_id="b")
    h = load_index(path, options=GalleryOptions(layout="int8"))[0]["images"]
    assert h.layout.name == "int8"
    q = queries()
    assert np.array_equal(h.view().topk(q, 10)[0], g.view().topk(q, 10)[0])
    local = h.view().gather(np.arange(10)).dequantized()[0]
    assert np.abs(local - g.view().gather(np.arange(10)).local).max() < 0.01


@pytest.mark.parametrize("saved, wanted", [("int8", "fp32"), ("int8", "int8-stage1")])
def test_loading_coarser_locals_as_finer_ones_is_a_typed_error(
    tmp_path: Path, saved: str, wanted: str
) -> None:
    path = save_index(tmp_path / "idx", {"images": filled(saved, batches=1, n=50)}, bundle_id="b")
    with pytest.raises(InputError, match=f"layout='{saved}'"):
        load_index(path, options=GalleryOptions(layout=wanted))


def _saved_as(path: Path, stage1: str, local: str) -> None:
    """Rewrite a saved gallery's manifest and arrays as an index of ``stage1``/``local`` storage was written
    before that storage was removed (the sha256 of every file kept right)."""
    m = json.loads((path / "index.json").read_text())
    entry = m["galleries"]["images"]
    entry["dtype"] = local
    entry["layout"] = {"name": "fp16", "stage1": stage1, "local": local, "gram": local}
    if local == "float16":
        for key in ("local", "gram"):
            f = path / entry["files"][key]
            np.save(f, np.load(f).astype(np.float16))
    if stage1 == "float16":
        f = path / "images_stage1_codes.npy"
        np.save(f, np.load(path / entry["files"]["stage1"]).astype(np.float16))
        entry["files"]["stage1_codes"] = f.name
        np.save(path / "images_stage1_peak.npy", np.zeros(2 * D, np.float32))
        entry["files"]["stage1_peak"] = "images_stage1_peak.npy"
    m["files"] = {name: sha256_file(path / name) for name in entry["files"].values()}
    (path / "index.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "stage1, local, what",
    [("float16", "float16", "the fp16 layout"), ("float32", "float16", "float16 locals")],
    ids=["fp16", "float16-locals"],
)
@pytest.mark.parametrize("wanted", [None, "fp32", "int8"])
def test_an_index_saved_in_the_removed_fp16_layout_is_refused_with_the_fix(
    tmp_path: Path, stage1: str, local: str, what: str, wanted: str | None
) -> None:
    path = save_index(tmp_path / "idx", {"images": filled("fp32", batches=1, n=50)}, bundle_id="b")
    _saved_as(path, stage1, local)
    with pytest.raises(IndexFileError) as info:  # neither loaded as saved nor converted (silently widened)
        load_index(path, bundle_id="b", options=GalleryOptions(layout=wanted))
    msg = str(info.value)
    assert f"index {path} was saved with {what}" in msg and "which was removed" in msg
    assert "layout 'int8' (smaller) or 'fp32' (exact)" in msg and "--layout int8" in msg


def test_a_tampered_scale_file_is_refused(tmp_path: Path) -> None:
    path = save_index(tmp_path / "idx", {"images": filled("int8", batches=1, n=50)}, bundle_id="b")
    f = path / "images_stage1_scale.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="sha256"):
        load_index(path)


def test_a_format_1_index_is_refused_with_the_fix(tmp_path: Path) -> None:
    g = filled("fp32", batches=1, n=40)
    path = save_index(tmp_path / "idx", {"images": g}, bundle_id="b")
    m = json.loads((path / "index.json").read_text())
    m["format_version"] = 1
    del m["galleries"]["images"]["layout"]  # what format 1 wrote
    (path / "index.json").write_text(json.dumps(m))
    with pytest.raises(IndexFileError, match="format 1 is older.*rebuild the index"):
        load_index(path, bundle_id="b")


def test_nan_is_refused_before_quantization() -> None:
    g = MemoryGallery(2 * D, D, GalleryOptions(layout="int8"))
    st, lo, ma, gr = items(3)
    st[1, 2] = np.inf
    with pytest.raises(InputError, match="NaN or inf"):
        g.add(st, lo, ma, gr)
    assert len(g) == 0 and g.codec is not None and g.codec.sigma is None


# ---- through the Retriever ------------------------------------------------------------------------
CAPTIONS = ["a red dog on the beach", "a man rides a blue bike", "two cats sit near a tree", "a small boat"]


@pytest.fixture(scope="module")
def encoded(tiny_bundle: Path) -> dict[str, Any]:
    from mssan_infer import Retriever

    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(120, 7, 24))).astype(np.float32)
    with Retriever.load(tiny_bundle) as r:
        words = "a red dog man cat blue bike boat tree beach green ball".split()
        caps = [" ".join(rng.choice(words, size=4)) for _ in range(150)]
        return {"images": r.encode_images(feats), "texts": r.encode_texts(caps), "feats": feats}


def _retriever(bundle: Path, layout: str, enc: dict[str, Any]) -> Any:
    from mssan_infer import Retriever

    r = Retriever.load(bundle, gallery=GalleryOptions(layout=layout))
    r.add_images(enc["images"])
    r.add_texts(enc["texts"])
    return r


@pytest.mark.parametrize("rerank", [20, 120])
def test_int8_stage1_layout_returns_the_exact_hits_and_scores_both_ways(
    tiny_bundle: Path, encoded: dict[str, Any], rerank: int
) -> None:
    exact, comp = _retriever(tiny_bundle, "fp32", encoded), _retriever(tiny_bundle, "int8-stage1", encoded)
    for a, b in (
        (exact.search(text=c, k=10, rerank=rerank), comp.search(text=c, k=10, rerank=rerank))
        for c in CAPTIONS
    ):
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    for j in range(4):
        a = exact.search(image=encoded["feats"][j], k=10, rerank=rerank)
        b = comp.search(image=encoded["feats"][j], k=10, rerank=rerank)
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_int8_locals_change_final_scores_by_less_than_1e2(tiny_bundle: Path, encoded: dict[str, Any]) -> None:
    exact, comp = _retriever(tiny_bundle, "fp32", encoded), _retriever(tiny_bundle, "int8", encoded)
    worst = 0.0
    for c in CAPTIONS:
        ref = {h.id: h for h in exact.search(text=c, k=120, rerank=120)}
        for h in comp.search(text=c, k=120, rerank=120):
            assert abs(h.stage1 - ref[h.id].stage1) < 1e-5  # stage 1 stays exact
            worst = max(worst, abs(h.score - ref[h.id].score))
    assert 0 < worst < 1e-2


def test_a_run_of_consecutive_rows_is_gathered_without_a_copy() -> None:
    g = MemoryGallery(2 * D, D)
    g.add(*items(100))
    v = g.view()
    c = v.gather(np.arange(10, 50))  # what exhaustive search asks for
    local = c.local
    assert np.shares_memory(local, v.blocks[0].local) and np.shares_memory(c.gram, v.blocks[0].gram)
    ref = v.gather(np.arange(10, 50)[::-1]).local[::-1]  # the copying path gives the same values
    assert np.array_equal(local, ref)


@pytest.mark.parametrize("layout", ["int8-stage1", "int8"])
def test_searches_during_adds_and_removes_see_whole_items(layout: str) -> None:
    import threading

    g = MemoryGallery(2 * D, D, GalleryOptions(layout=layout), segment_rows=64)
    vectors: dict[int, np.ndarray] = {}
    st, lo, ma, gr = items(200, seed=0)
    g.add(st, lo, ma, gr, ids=list(range(200)))
    vectors.update({i: st[i] for i in range(200)})
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        nxt = 200
        for j in range(30):
            s, lo_, ma_, gr_ = items(20, seed=100 + j)
            ids = list(range(nxt, nxt + 20))
            vectors.update({i: s[k] for k, i in enumerate(ids)})
            g.add(s, lo_, ma_, gr_, ids=ids)
            g.remove(ids[:5])
            nxt += 20
        stop.set()

    def reader() -> None:
        q = queries(2)
        while not stop.is_set():
            v = g.view()
            rows, scores = v.topk(q, 15)
            for qi in range(2):
                for r, s in zip(rows[qi], scores[qi]):
                    want = float(q[qi] @ vectors[v.ids_at([r])[0]])
                    if abs(want - float(s)) > 1e-4:
                        errors.append(f"row {r}: {s} != {want}")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(g) == 200 + 30 * 15


def test_a_saved_empty_gallery_keeps_its_layout_when_loaded(tiny_bundle: Path, tmp_path: Path) -> None:
    with Retriever.load(tiny_bundle, gallery=GalleryOptions(layout="int8")) as r:
        r.add_texts(["a red dog", "a blue ball"])  # the image gallery stays empty
        r.save(tmp_path / "idx")
    with Retriever.load(tiny_bundle, index=tmp_path / "idx") as back:
        assert len(back.images) == 0
        assert back.images.layout.name == "int8" and back.texts.layout.name == "int8"
