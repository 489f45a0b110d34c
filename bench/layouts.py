"""Gallery layouts side by side: the same gallery as fp32, int8-stage1 and int8
(``mssan_infer.gallery.storage``).

For one gallery size, :func:`layout_retrievers` opens the gallery in each layout next to the
default fp32 one (sharing the bundle's backend): int8 is converted while loading the
saved float32 index (``load_index(layout=...)``, as a user would) or, for a memory-mapped gallery,
read from a copy saved once in that layout (:func:`layout_index`: what an edge box maps), int8-stage1
keeps the fp32 gallery's locals and adds int8 stage-1 codes. :func:`layout_group` times them in one
interleaved group. :func:`resident_mb` loads each layout in a fresh process (bundle + gallery, no PyTorch)
and reads its resident memory after a few searches. :func:`bytes_per_query` is the memory a
query reads in each layout, to compare with the measured bandwidth.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mssan_infer import GalleryOptions
from mssan_infer.gallery.base import extent
from mssan_infer.gallery.folder import encode_stage1, load_index, save_index
from mssan_infer.gallery.memory import MemoryGallery
from mssan_infer.gallery.storage import LAYOUTS
from mssan_infer.gallery.view import fetch_rows
from mssan_infer.names import INDEX_MANIFEST

__all__ = [
    "LAYOUT_NAMES",
    "layout_folder",
    "layout_index",
    "layout_retrievers",
    "layout_group",
    "resident_mb",
    "bytes_per_query",
    "bandwidth_gbs",
]

log = logging.getLogger(__name__)
LAYOUT_NAMES = tuple(LAYOUTS)  # fp32 first: the others are opened beside it
BYTES = {"float32": 4, "float16": 2, "int8": 1}  # float16: the int8 layout's Grams


def _share_locals(g: MemoryGallery, layout: str) -> MemoryGallery:
    """``g``'s stored arrays with a compressed stage 1 added (same float32 locals: no second copy)."""
    v = g.view()
    b = v.blocks[0]
    out = MemoryGallery(g.stage1_dim, g.local_dim, GalleryOptions(layout=layout))
    codec, codes, outliers = encode_stage1(LAYOUTS[layout].stage1, b.stage1)
    out.adopt(
        (b.stage1, b.local, b.mask, b.gram), list(v.ids[: v.n]), codes=codes, codec=codec, outliers=outliers
    )
    return out


def layout_folder(index: Path, layout: str) -> Path:
    """Where :func:`layout_index` saves the ``layout`` copy of the index folder ``index`` (beside it)."""
    return index.with_name(f"{index.name}-{layout}")


def layout_index(index: Path, gname: str, layout: str, mmap: bool) -> Path:
    """The index folder to open ``layout`` from: ``index`` itself (converted while loading), or, for a
    memory-mapped gallery with compressed locals, a copy saved once in that layout beside it.

    Converting a memory-mapped gallery at load writes the new locals to a spill file: at 100K images
    that is 3.7 GB (int8) of dirty pages competing with the page cache, and a query's candidates then
    come back from disk. A deployment saves the layout once (``index --layout int8``) and maps it.
    """
    if not mmap or LAYOUTS[layout].local == "float32":
        return index
    out = layout_folder(index, layout)
    if not (out / INDEX_MANIFEST).is_file():
        log.info("layouts: saving the %s gallery of %s as %s (once)", gname, index.name, layout)
        galleries, manifest = load_index(
            index, verify=False, options=GalleryOptions(layout=layout, mmap=True)
        )
        save_index(out, {gname: galleries[gname]}, bundle_id=manifest["bundle_id"])
        del galleries
    return out


def layout_retrievers(r: Any, index: Path, gname: str, mmap: bool) -> dict[str, Any]:
    """``{layout: Retriever}`` on ``r``'s backend, the ``gname`` gallery of ``index`` in each layout."""
    from mssan_infer import Retriever

    out: dict[str, Any] = {"fp32": r}
    base = r.images if gname == "images" else r.texts
    for name in LAYOUT_NAMES[1:]:
        log.info("layouts: opening the %s gallery as %s", gname, name)
        if name == "int8-stage1":
            g = _share_locals(base, name)
        else:
            g = load_index(
                layout_index(index, gname, name, mmap),
                verify=False,
                options=GalleryOptions(layout=name, mmap=mmap),
            )[0][gname]
        other = MemoryGallery(base.stage1_dim, base.local_dim)
        images, texts = (g, other) if gname == "images" else (other, g)
        out[name] = Retriever(
            r.bundle,
            r.backend,
            r.tokenizer,
            images,
            texts,
            r.search_options,
        )
    return out


def layout_group(
    rs: dict[str, Any], text_query: bool, next_q: Callable[[], Any], encoded: list[Any], k: int = 10
) -> dict[str, Callable[[], Any]]:
    """Candidates per layout: the whole query at rerank 100, the query without its encoder, and its parts."""
    from mssan_infer.search import backend_score_fn, rerank_scores, uses_query_scorers

    fns: dict[str, Callable[[], Any]] = {}
    state = {"i": 0}

    def next_enc() -> Any:
        state["i"] += 1
        return encoded[state["i"] % len(encoded)]

    for name, r in rs.items():
        view = (r.images if text_query else r.texts).view()
        q0 = encoded[0]
        rows = view.topk(q0.stage1, 100)[0][0]
        if text_query:
            fns[f"rerank_100[{name}]"] = lambda r=r: r.search(text=next_q(), k=k, rerank=100)
        else:
            fns[f"rerank_100[{name}]"] = lambda r=r: r.search(image=next_q(), k=k, rerank=100)
        fns[f"no_encode_100[{name}]"] = lambda r=r: r.search_encoded(
            next_enc(), query_is_text=text_query, k=k, rerank=100
        )
        fns[f"stage1_topk100[{name}]"] = lambda view=view: view.topk(next_enc().stage1, 100)
        sim = uses_query_scorers(r.backend)  # float32 candidates as their similarities to the query
        q_local = q0.local[0, : max(1, extent(q0.mask[:1]))]
        fns[f"gather_100[{name}]"] = lambda view=view, rows=rows, r=r, sim=sim, q_local=q_local: view.gather(
            rows, r._gatherer(), r.gather_threads, query=q_local if sim else None
        )
        fns[f"scorer_100[{name}]"] = lambda view=view, rows=rows, r=r, q0=q0, sim=sim: rerank_scores(
            q0,
            0,
            view,
            rows,
            backend_score_fn(r.backend, query_is_text=text_query),
            query_is_text=text_query,
            batch=r.scorer_batch,
            executor=r._gatherer(),
            parts=r.gather_threads,
            similarity=sim,
        )
    return fns


def bytes_per_query(layout: str, n: int, d: int, p: int, q_len: int, rerank: int = 100) -> dict[str, float]:
    """Bytes one query reads after encoding: the stage-1 scan (plus the candidates' float32 rows when the
    stage 1 is compressed), the candidates' stored locals/masks/Grams, and the scorer's inputs (the
    ``int8`` layout's codes, scales and float16 Grams as stored; float32 for the other layouts)."""
    lay = LAYOUTS[layout]
    d2 = 2 * d
    stage1 = n * d2 * BYTES[lay.stage1]
    if lay.compressed_stage1:
        stage1 += fetch_rows(n, rerank) * d2 * 4
    item = p * d * BYTES[lay.local] + p * 4 + p * p * BYTES[lay.gram] + (p * 4 if lay.local == "int8" else 0)
    gather = rerank * item
    scorer = (gather if lay.local == "int8" else rerank * (p * d + p + p * p) * 4) + (
        q_len * d + q_len + q_len * q_len
    ) * 4
    return {
        "stage1": float(stage1),
        "gather": float(gather),
        "scorer": float(scorer),
        "total": float(stage1 + gather + scorer),
    }


def bandwidth_gbs(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth (GB/s, best of ``repeats``): a float32 matrix-vector product over ``gib`` GiB on
    numpy's BLAS with ``threads`` threads, the access pattern of an exact stage 1."""
    import time

    from .timing import numpy_blas_setter

    cols = 2048
    rows = int(gib * 2**30 / (4 * cols))
    a = np.ones((rows, cols), np.float32)
    x = np.ones(cols, np.float32)
    set_threads = numpy_blas_setter()
    set_threads(threads)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ x
        best = min(best, time.perf_counter() - t0)
    del a
    return rows * cols * 4 / best / 1e9


RESIDENT = """
import json, sys, numpy as np
from bench.timing import rss_mb, peak_rss_mb
from mssan_infer import GalleryOptions, OnnxRuntimeOptions, Retriever
bundle, index, layout, mmap, text = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", \
sys.argv[5] == "1"
kw = {} if index == "-" else {"index": index, "gallery": GalleryOptions(layout=layout, mmap=mmap)}
r = Retriever.load(bundle, OnnxRuntimeOptions(threads=2), verify=False, **kw)
queries = json.loads(sys.argv[6])
if index != "-":
    for i in range(20):
        if text:
            r.search(text=queries[i % len(queries)], k=10, rerank=100)
        else:
            rng = np.random.default_rng(i)
            r.search(image=np.abs(rng.standard_normal((36, r.img_dim), dtype=np.float32)), k=10, rerank=100)
print(json.dumps({"rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}))
"""


def resident_mb(
    bundle: Path, index: Path | None, layout: str, mmap: bool, text_query: bool, captions: list[str]
) -> dict[str, float]:
    """Resident memory of a fresh process that loads ``bundle`` and the index in ``layout`` and
    searches 20 times (``index=None``: the bundle alone)."""
    root = str(Path(__file__).resolve().parents[1])
    cmd = [
        sys.executable,
        "-c",
        RESIDENT,
        str(bundle),
        str(index) if index else "-",
        layout,
        "1" if mmap else "0",
        "1" if text_query else "0",
        json.dumps(captions[:20]),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"resident-memory probe failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
