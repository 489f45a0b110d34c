"""Property-based tests (hypothesis): the tokenizer, search on arbitrary text, and the gallery index
against a model of it under add/remove/save/load."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mssan_infer import GalleryOptions, Retriever
from mssan_infer.errors import MssanError
from mssan_infer.gallery.folder import load_index, save_index
from mssan_infer.gallery.memory import MemoryGallery
from mssan_infer.text.words import UNK_ID, Tokenizer, build_vocab, tokenize

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
WORDS = ["a", "red", "dog", "on", "the", "beach", "blue", "ball", "man", "street"]
VOCAB = build_vocab([" ".join(WORDS)] * 4)

# any str, including surrogates, controls, combining marks and very long inputs
any_text = st.text(
    st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=200
) | st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\ud800",
        "dog's",
        "DOG\u2019S",
        "ﬁ",
        "①②",
        "a" * 5000,
        "dog " * 300,
        "\u0301\u0301",
        "\n\t\r",
    ]
)
captions = (
    st.lists(st.sampled_from(WORDS + ["zebra", "?!", "  ", "DOG", "dog's"]), max_size=40).map(" ".join)
    | any_text
)


@FAST
@given(any_text)
def test_tokenizer_never_raises_on_a_str_and_is_deterministic(text: str) -> None:
    a, b = tokenize(text), tokenize(text)
    assert a == b and all(isinstance(w, str) and w for w in a)
    tok = Tokenizer(VOCAB, max_len=8)
    ids = tok.encode(text)
    assert ids == tok.encode(text) and len(ids) <= 8
    assert all(0 <= i < len(VOCAB) for i in ids) and all(i == UNK_ID or i > UNK_ID for i in ids)
    assert tokenize(" ".join(a)) == a  # words are stable under re-tokenisation


@FAST
@given(st.lists(any_text, max_size=6))
def test_encode_batch_pads_every_caption_to_one_shape(texts: list[str]) -> None:
    tok = Tokenizer(VOCAB, max_len=8)
    tokens, mask = tok.encode_batch(texts)
    assert tokens.shape == mask.shape == (len(texts), tokens.shape[1]) and tokens.shape[1] >= 1
    assert ((tokens == 0) | (mask == 1)).all()


@pytest.fixture(scope="module")
def searcher(tiny_bundle: Path) -> Retriever:
    r = Retriever.load(tiny_bundle)
    rng = np.random.default_rng(0)
    r.add_images(rng.normal(size=(8, 5, 24)).astype(np.float32))
    r.add_texts(["a red dog", "the blue ball", "a man in the street"])
    return r


@FAST
@given(text=captions, k=st.integers(-2, 12), rerank=st.integers(-2, 12))
def test_search_on_arbitrary_text_succeeds_exactly_when_the_query_is_valid(
    searcher: Retriever, text: str, k: int, rerank: int
) -> None:
    valid = k >= 1 and rerank >= 0 and any(t != UNK_ID for t in searcher.tokenizer.encode(text))
    try:
        hits = searcher.search(text=text, k=k, rerank=rerank)
    except MssanError:
        assert not valid, f"a valid query was refused: {text!r} k={k} rerank={rerank}"
        return
    assert valid, f"an invalid query was answered: {text!r} k={k} rerank={rerank}"
    assert len(hits) == min(k, searcher.n_images)
    assert all(np.isfinite(h.score) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


@FAST
@given(
    image=st.one_of(
        st.integers(0, 6).flatmap(
            lambda r: st.lists(
                st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=r * 24, max_size=r * 24
            ).map(lambda xs: np.array(xs, np.float32).reshape(-1, 24))
        ),
        st.integers(1, 6).map(lambda r: np.random.default_rng(r).normal(size=(r, 24)).astype(np.float32)),
        st.sampled_from([np.zeros((3, 23)), np.zeros((2, 3, 24)), np.zeros(24), np.array(1.0)]),
    )
)
def test_search_on_arbitrary_image_arrays_succeeds_exactly_when_the_image_is_valid(
    searcher: Retriever, image: np.ndarray
) -> None:
    valid = (
        image.ndim == 2 and image.shape[0] >= 1 and image.shape[1] == 24 and bool(np.isfinite(image).all())
    )
    try:
        hits = searcher.search(image=image, k=2)
    except MssanError:
        assert not valid, f"a valid image was refused: shape {image.shape}"
        return
    assert valid, f"an invalid image was answered: shape {image.shape}"
    assert len(hits) == 2 and all(np.isfinite(h.score) for h in hits)


# ---- the gallery index against a model -----------------------------------------------------------
D = 4


def _item(seed: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    local = rng.normal(size=(1, length, D)).astype(np.float32)
    mask = np.ones((1, length), np.float32)
    return rng.normal(size=(1, 2 * D)).astype(np.float32), local, mask, local @ local.transpose(0, 2, 1)


class IndexMachine(RuleBasedStateMachine):
    """Adds, removes, saves and loads a MemoryGallery; after every step it must equal a plain list model."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="mssan-prop-"))
        self.model: list[tuple[Any, int, int]] = []  # (id, seed, length) in order
        self.saved: list[tuple[Any, int, int]] | None = None
        self.index = MemoryGallery(2 * D, D)

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    @initialize()
    def start(self) -> None:
        self.index = MemoryGallery(2 * D, D)

    @rule(
        ident=st.one_of(st.integers(0, 20), st.sampled_from(["a", "b", "c", "é", "x y"])),
        seed=st.integers(0, 1000),
        length=st.integers(1, 6),
    )
    def add(self, ident: Any, seed: int, length: int) -> None:
        present = any(i == ident and type(i) is type(ident) for i, _, _ in self.model)
        try:
            self.index.add(*_item(seed, length), ids=[ident])
        except MssanError:
            assert present
            return
        assert not present
        self.model.append((ident, seed, length))

    @rule(seed=st.integers(0, 1000), length=st.integers(1, 6))
    def add_default_id(self, seed: int, length: int) -> None:
        (new,) = self.index.add(*_item(seed, length))
        ints = [i for i, _, _ in self.model if isinstance(i, int)]
        assert new == (max(ints) + 1 if ints else 0)
        self.model.append((new, seed, length))

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        ids = [i for i, _, _ in self.model]
        drop = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3))
        self.index.remove(drop)
        self.model = [m for m in self.model if m[0] not in drop]

    @rule()
    def remove_unknown_changes_nothing(self) -> None:
        try:
            self.index.remove(["never-added"])
        except MssanError:
            return
        raise AssertionError("removing an unknown id must fail")

    @rule()
    def save(self) -> None:
        save_index(self.tmp / "idx", {"g": self.index}, bundle_id="b")
        self.saved = list(self.model)

    @precondition(lambda self: self.saved is not None)
    @rule(mmap=st.booleans())
    def load(self, mmap: bool) -> None:
        galleries, _ = load_index(
            self.tmp / "idx", bundle_id="b", options=GalleryOptions(mmap=mmap, spill_dir=self.tmp / "spill")
        )
        self.index = galleries["g"]
        assert self.saved is not None
        self.model = list(self.saved)

    @invariant()
    def equals_the_model(self) -> None:
        assert self.index.ids == [i for i, _, _ in self.model]
        view = self.index.view()
        assert view.n == len(self.model)
        if not self.model:
            return
        q = np.random.default_rng(99).normal(size=(2, 2 * D)).astype(np.float32)
        rows, scores = view.topk(q, len(self.model))
        stage1 = np.concatenate([_item(s, n)[0] for _, s, n in self.model])
        expect = q @ stage1.T
        np.testing.assert_allclose(scores, np.take_along_axis(expect, rows, 1), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(scores[:, 0], expect.max(1), rtol=1e-6, atol=1e-6)
        got = view.gather(np.arange(len(self.model)))
        local, mask, gram = got.local, got.mask, got.gram
        for row, (_, seed, length) in enumerate(self.model):
            _, lo, _, gr = _item(seed, length)
            assert mask[row].sum() == length
            np.testing.assert_array_equal(local[row, :length], lo[0])
            np.testing.assert_array_equal(gram[row, :length, :length], gr[0])


IndexMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=15, deadline=None)
test_gallery_index_equals_a_model_under_add_remove_save_load = IndexMachine.TestCase
