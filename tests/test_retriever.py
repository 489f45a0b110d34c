"""Retriever end to end against the PyTorch model: scores, rankings, save/load, FAISS IVF, int8-memmap,
threads, errors."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mssan_infer import (
    Encoded,
    GalleryOptions,
    Hit,
    Layout,
    OnnxRuntimeOptions,
    Retriever,
    SearchOptions,
    Stage1Options,
)
from mssan_infer.errors import InputError

CAPTIONS = [
    "a red dog on the beach",
    "the blue ball near a tree",
    "a man sits in the street",
    "woman",
    "a big white house with a small green car and a black bird near the boat in the field",
    "two cats: a yellow one, and a zebra",  # unknown words mixed in
    "A DOG'S BALL!",
]


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Any:
    from training.checkpoint import load_model

    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def gallery() -> tuple[np.ndarray, np.ndarray]:
    """40 images of 7 regions (some padded) with the tiny model's Dv=24."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 7, 24)).astype(np.float32)
    mask = np.ones((40, 7), np.float32)
    mask[::3, 4:] = 0
    mask[1::5, 6:] = 0
    feats[mask == 0] = 0
    return feats, mask


@pytest.fixture(scope="module")
def retriever(bundle: Path, gallery: tuple[np.ndarray, np.ndarray]) -> Retriever:
    r = Retriever.load(bundle, search=SearchOptions(batch_size=16))
    feats, mask = gallery
    r.add_images(feats, mask=mask, ids=[f"img{i}" for i in range(len(feats))])
    r.add_texts(CAPTIONS)
    return r


@pytest.fixture(scope="module")
def reference(model: Any, gallery: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """PyTorch ``model.score`` [40 images, 7 captions]."""
    net, tok = model
    feats, mask = gallery
    with torch.inference_mode():
        img = net.encode_image(torch.tensor(feats), torch.tensor(mask))
        tokens, tmask = tok.encode_batch(CAPTIONS)
        txt = net.encode_text(torch.tensor(tokens), torch.tensor(tmask))
        return net.score(img, txt).numpy()


def _row(hit: Hit) -> int:
    return int(str(hit.id)[3:])


def test_bundle_tokenizer_gives_the_checkpoint_tokenizers_ids(retriever: Retriever, model: Any) -> None:
    _, tok = model
    awkward = [
        "",
        " ",
        "!!!",
        "a",
        "A Dog's ball",
        "dog’s",
        "naïve café 東京 ｆｕｌｌｗｉｄｔｈ ﬁ",
        "red,blue;green:yellow",
        "tab\tnew\nline\r\n",
        "under_score and-hyphen",
        "123 4th",
        "'quoted' \"dog\"",
        "😀 dog 😀",
        "\u00a0non\u00a0breaking",
        "a " * 200,
        "x" * 5000,
        "İstanbul ß ΣΊΣΥΦΟΣ",
    ]
    assert retriever.tokenizer.max_len == tok.max_len
    for text in awkward:
        assert retriever.tokenizer.encode(text) == tok.encode(text), text
    for a, b in zip(retriever.tokenizer.encode_batch(awkward), tok.encode_batch(awkward)):
        assert np.array_equal(a, b)


def test_encoders_match_the_pytorch_model(
    retriever: Retriever, model: Any, gallery: tuple[np.ndarray, np.ndarray]
) -> None:
    net, tok = model
    feats, mask = gallery
    enc = retriever.encode_images(feats[:9], mask[:9])
    txt = retriever.encode_texts(CAPTIONS)
    with torch.inference_mode():
        ref_i = net.encode_image(torch.tensor(feats[:9]), torch.tensor(mask[:9]))
        ref_t = net.encode_text(*map(torch.tensor, tok.encode_batch(CAPTIONS)))
    for ours, ref in ((enc, ref_i), (txt, ref_t)):
        assert isinstance(ours, Encoded)
        for name in ("stage1", "local", "mask", "gram"):
            np.testing.assert_allclose(
                getattr(ours, name), getattr(ref, name).numpy(), atol=1e-5, err_msg=name
            )


def test_list_of_ragged_images_equals_padded_array_with_mask(
    retriever: Retriever, gallery: tuple[np.ndarray, np.ndarray]
) -> None:
    feats, mask = gallery
    ragged = [feats[i][mask[i] > 0] for i in range(6)]
    a, b = retriever.encode_images(ragged), retriever.encode_images(feats[:6], mask[:6])
    np.testing.assert_allclose(a.stage1, b.stage1, atol=1e-6)
    np.testing.assert_allclose(a.local, b.local, atol=1e-6)


@pytest.mark.parametrize("rerank", [5, 40])
def test_every_final_score_is_the_pytorch_score_in_both_directions(
    retriever: Retriever, reference: np.ndarray, gallery: tuple[np.ndarray, np.ndarray], rerank: int
) -> None:
    for j, cap in enumerate(CAPTIONS):
        hits = retriever.search(text=cap, k=10, rerank=rerank)
        assert len(hits) == 10
        for h in hits:
            assert abs(h.score - reference[_row(h), j]) < 1e-4
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    feats, mask = gallery
    for i in range(0, 40, 7):
        hits = retriever.search(image=feats[i][mask[i] > 0], k=5, rerank=rerank)
        for h in hits:
            assert abs(h.score - reference[i, int(h.id)]) < 1e-4  # type: ignore[arg-type]


def test_rerank_depth_equal_to_gallery_matches_exhaustive_ranking_both_directions(
    retriever: Retriever, reference: np.ndarray, gallery: tuple[np.ndarray, np.ndarray]
) -> None:
    for j, cap in enumerate(CAPTIONS):
        hits = retriever.search(text=cap, k=40, rerank=40)
        assert [_row(h) for h in hits] == np.argsort(-reference[:, j], kind="stable").tolist()
    feats, mask = gallery
    results = retriever.search_batch(images=feats, image_mask=mask, k=len(CAPTIONS), rerank=len(CAPTIONS))
    for i, hits in enumerate(results):
        assert [h.id for h in hits] == np.argsort(-reference[i], kind="stable").tolist()


def test_rerank_zero_is_stage1_only(
    retriever: Retriever, model: Any, gallery: tuple[np.ndarray, np.ndarray]
) -> None:
    net, tok = model
    feats, mask = gallery
    with torch.inference_mode():
        s1 = net.stage1_score(
            net.encode_image(torch.tensor(feats), torch.tensor(mask)),
            net.encode_text(*map(torch.tensor, tok.encode_batch(CAPTIONS[:1]))),
        ).numpy()[:, 0]
    hits = retriever.search(text=CAPTIONS[0], k=12, rerank=0)
    assert [_row(h) for h in hits] == np.argsort(-s1)[:12].tolist()
    assert all(h.score == h.stage1 and abs(h.stage1 - s1[_row(h)]) < 1e-5 for h in hits)


def test_rerank_below_k_is_raised_to_k(retriever: Retriever, reference: np.ndarray) -> None:
    hits = retriever.search(text=CAPTIONS[1], k=8, rerank=2)
    assert len(hits) == 8 and all(abs(h.score - reference[_row(h), 1]) < 1e-4 for h in hits)
    assert any(h.score != h.stage1 for h in hits)


def test_search_batch_equals_single_searches(retriever: Retriever) -> None:
    batch = retriever.search_batch(texts=CAPTIONS, k=6, rerank=15)
    single = [retriever.search(text=c, k=6, rerank=15) for c in CAPTIONS]
    for a, b in zip(batch, single):
        assert [h.id for h in a] == [h.id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_gathering_candidates_on_several_threads_changes_nothing(retriever: Retriever) -> None:
    one = Retriever(
        retriever.bundle,
        retriever.backend,
        retriever.tokenizer,
        retriever.images,
        retriever.texts,
        SearchOptions(gather_threads=1, rerank_threads=1),
    )
    three = Retriever(
        retriever.bundle,
        retriever.backend,
        retriever.tokenizer,
        retriever.images,
        retriever.texts,
        SearchOptions(gather_threads=3),
    )
    assert three._gatherer() is not None and one._gatherer() is None
    for c in CAPTIONS:
        a, b = one.search(text=c, k=40, rerank=40), three.search(text=c, k=40, rerank=40)
        assert [(h.id, h.score, h.stage1) for h in a] == [(h.id, h.score, h.stage1) for h in b]
    three._gather_pool.shutdown()  # type: ignore[union-attr]   (the backend is the fixture's)


def test_save_load_round_trip_gives_identical_results(
    retriever: Retriever, bundle: Path, gallery: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    retriever.save(tmp_path / "idx")
    again = Retriever.load(bundle, index=tmp_path / "idx")
    assert again.images.ids == retriever.images.ids and again.texts.ids == retriever.texts.ids
    for cap in CAPTIONS:
        assert again.search(text=cap, k=7, rerank=20) == retriever.search(text=cap, k=7, rerank=20)
    img = gallery[0][3]
    assert again.search(image=img, k=3) == retriever.search(image=img, k=3)


def test_faiss_ivf_probing_every_list_and_numpy_stage1_return_the_same_topk(
    retriever: Retriever, bundle: Path, tmp_path: Path
) -> None:
    import faiss  # noqa: F401  (dev extra)

    retriever.save(tmp_path / "idx")
    with_faiss = Retriever.load(  # 40 images: the default nlist is 1, and every list is probed
        bundle, index=tmp_path / "idx", gallery=GalleryOptions(stage1=Stage1Options(method="faiss-ivf"))
    )
    assert with_faiss.images.view().faiss_index.nprobe == with_faiss.images.view().faiss_index.nlist
    for cap in CAPTIONS:
        a = with_faiss.search(text=cap, k=15, rerank=0)
        b = retriever.search(text=cap, k=15, rerank=0)
        assert [h.id for h in a] == [h.id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
        assert [h.id for h in with_faiss.search(text=cap, k=5, rerank=20)] == [
            h.id for h in retriever.search(text=cap, k=5, rerank=20)
        ]


def test_int8_memmapped_locals_score_as_in_ram_and_near_fp32(
    retriever: Retriever, bundle: Path, gallery: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    retriever.save(tmp_path / "idx")
    int8_locals = Layout("float32", "int8")
    small = Retriever.load(
        bundle,
        index=tmp_path / "idx",
        gallery=GalleryOptions(layout=int8_locals, mmap=True, spill_dir=tmp_path / "spill"),
    )
    in_ram = Retriever.load(bundle, index=tmp_path / "idx", gallery=GalleryOptions(layout=int8_locals))
    local = small.images.view().blocks[0].local
    assert local.dtype == np.uint8 and isinstance(local, np.memmap)
    for cap in CAPTIONS:
        ref = {h.id: h.score for h in retriever.search(text=cap, k=40, rerank=40)}
        same = {h.id: h.score for h in in_ram.search(text=cap, k=40, rerank=40)}
        for h in small.search(text=cap, k=40, rerank=40):
            assert abs(h.score - same[h.id]) < 1e-5  # mapped: the same stored codes
            assert abs(h.score - ref[h.id]) < 0.05  # int8 locals: near the float32 scores
    fresh = Retriever.load(
        bundle,
        gallery=GalleryOptions(layout=int8_locals, mmap=True, spill_dir=tmp_path / "spill2"),
    )
    feats, mask = gallery
    fresh.add_images(feats, mask=mask, ids=[f"img{i}" for i in range(40)])
    local = fresh.images.view().blocks[0].local  # mapped from spill2 (unlinked once mapped)
    assert isinstance(local, np.memmap) and Path(local.filename).parent == tmp_path / "spill2"
    got = {h.id: h.score for h in fresh.search(text=CAPTIONS[0], k=40, rerank=40)}
    ref = {h.id: h.score for h in in_ram.search(text=CAPTIONS[0], k=40, rerank=40)}
    assert max(abs(got[i] - ref[i]) for i in ref) < 1e-5


def test_concurrent_searches_from_8_threads_equal_serial_ones(
    retriever: Retriever, gallery: tuple[np.ndarray, np.ndarray]
) -> None:
    feats, mask = gallery
    queries: list[dict[str, Any]] = [{"text": c} for c in CAPTIONS] + [
        {"image": feats[i][mask[i] > 0]} for i in range(5)
    ]
    serial = [retriever.search(**q, k=5, rerank=20) for q in queries]
    results: dict[tuple[int, int], list[Hit]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for rep in range(3):
                for qi in range((t + rep) % len(queries), len(queries)):
                    results[(t, qi)] = retriever.search(**queries[qi], k=5, rerank=20)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert results and all(hits == serial[qi] for (_, qi), hits in results.items())


def test_searches_during_adds_and_removes_stay_consistent(bundle: Path) -> None:
    r = Retriever.load(bundle)
    rng = np.random.default_rng(5)
    r.add_images(rng.normal(size=(20, 5, 24)).astype(np.float32), ids=[f"base{i}" for i in range(20)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def mutate() -> None:
        try:
            for j in range(15):
                ids = [f"m{j}-{i}" for i in range(3)]
                r.add_images(rng.normal(size=(3, 4 + j % 3, 24)).astype(np.float32), ids=ids)
                r.remove(ids[:2])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    def search() -> None:
        try:
            while not stop.is_set():
                hits = r.search(text="a red dog", k=5, rerank=10)
                assert len(hits) == 5 and len({h.id for h in hits}) == 5
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=mutate)] + [threading.Thread(target=search) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and r.n_images == 35


def test_remove_takes_items_out_of_results(bundle: Path, gallery: tuple[np.ndarray, np.ndarray]) -> None:
    r = Retriever.load(bundle)
    feats, mask = gallery
    r.add_images(feats[:10], mask=mask[:10], ids=list(range(10)))
    r.add_texts(["a dog", "a cat"], ids=["t0", "t1"])
    top = r.search(text="a dog", k=1)[0].id
    r.remove([top])
    assert top not in [h.id for h in r.search(text="a dog", k=9)] and r.n_images == 9
    with pytest.raises(InputError, match="unknown"):
        r.remove([top, 3 if top != 3 else 4])
    assert r.n_images == 9 and len(r) == 11
    r.remove(["t1"])
    assert r.texts.ids == ["t0"]


def test_fp16_graphs_score_within_the_fp16_tolerance_of_pytorch(
    bundle: Path, gallery: tuple[np.ndarray, np.ndarray], reference: np.ndarray
) -> None:
    half = Retriever.load(bundle, OnnxRuntimeOptions(precision="fp16"))
    half.add_images(gallery[0], mask=gallery[1], ids=[f"img{i}" for i in range(40)])
    for h in half.search(text=CAPTIONS[0], k=10, rerank=40):
        assert abs(h.score - reference[_row(h), 0]) < 2e-2
