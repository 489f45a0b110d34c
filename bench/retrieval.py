"""Section 2: end-to-end query latency of two-stage retrieval vs exhaustive scoring, per gallery size.

Galleries are written straight into the saved-index layout from a pool of
items encoded by the bundle's own encoders (tiled, with fresh stage-1
vectors per item), then opened with ``Retriever.load(index=...)``: in RAM as
float32, or (``mmap_fp16`` sizes) float16 memory-mapped from disk. Encoding
cost is measured separately (section 4); latency does not depend on the values.

The bundle is the caller's: ``python -m bench`` passes the default tower's (a paper-size random MSSAN
with the MiniLM text tower cut to 2 layers), so the default query path is exact (fp32 graphs, ``fp32``
layout) and the fast path is the int8 text encoder with the ``int8`` layout (``int8_text_encoder``).

Per size, interleaved groups run on the same query sequence:
- fast: ``search`` at each rerank depth, plus a breakdown of rerank 100
  (query encoding, stage-1 top-k, candidate gather, scorer);
- backend settings (``variant_options``, IVF stage 1) beside the default;
- layouts (sizes with ``"layouts"``): each gallery layout at rerank 100 and its parts (``bench.layouts``),
  then the floor group (``bench.floor``): the exact default and the fast path, each step beside its floor;
- slow: rerank 100 again (and the fast path), exhaustive through the runtime (rerank = gallery
  size) and exhaustive PyTorch (encode the query, ``MSSAN.score`` over the
  whole gallery in shards, top-k) — the speedups come from this group.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mssan_infer.gallery.base import extent
from mssan_infer.gallery.stage1 import default_ivf_nlist
from mssan_infer.gallery.storage import Layout
from mssan_infer.names import INDEX_FORMAT, INDEX_FORMAT_VERSION
from mssan_infer.search import backend_score_fn, rerank_scores, uses_query_scorers

from .timing import numpy_blas_setter, peak_rss_mb, reset_peak_rss, side_by_side

__all__ = [
    "gallery_folder",
    "write_gallery_index",
    "run_latency",
    "stage1_variant",
    "ivf_options",
    "query_backend",
    "fast_path",
]

log = logging.getLogger(__name__)
SHARD = 1024
IVF_PROBE_FRACTION = 0.025  # IVF stage 1: probe 2.5% of the lists (16 of 632 at 25K items)
BLOCK = 5  # query calls per candidate per round (after one untimed call), see timing.side_by_side


def rounds(calls: int) -> int:
    """Rounds of :data:`BLOCK` calls that give about ``calls`` timed calls."""
    return max(3, -(-calls // BLOCK))


def gallery_folder(work: Path, gname: str, n_items: int, bundle_id: str, dtype: str = "float32") -> Path:
    """Where the latency section keeps the ``gname`` gallery (``images`` / ``texts``) of ``n_items`` items
    of ``dtype`` locals for the bundle ``bundle_id`` (:func:`write_gallery_index` writes it)."""
    return work / f"gallery-{gname}-{n_items}-{dtype}-{bundle_id}"


def write_gallery_index(
    folder: Path, name: str, pool: Any, n: int, dtype: str, bundle_id: str, seed: int = 0
) -> Path:
    """Write a gallery of ``n`` items tiled from ``pool`` (runtime ``Encoded``) as an index folder.

    Stage-1 vectors are the pool's plus fresh noise (so top-k sees distinct scores).
    File digests are not computed (open with ``verify=False``); the folder is reused when present.
    """
    if (folder / "index.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    m, p, d = pool.local.shape
    rng = np.random.default_rng(seed)
    files = {a: f"{name}_{a}.npy" for a in ("stage1", "local", "mask", "gram")}
    st = np.lib.format.open_memmap(folder / files["stage1"], "w+", np.float32, (n, 2 * d))
    lo = np.lib.format.open_memmap(folder / files["local"], "w+", np.dtype(dtype), (n, p, d))
    ma = np.lib.format.open_memmap(folder / files["mask"], "w+", np.float32, (n, p))
    gr = np.lib.format.open_memmap(folder / files["gram"], "w+", np.dtype(dtype), (n, p, p))
    local = pool.local.astype(dtype)
    gram = pool.gram.astype(dtype)
    for a in range(0, n, m):
        b = min(n, a + m)
        k = b - a
        noise = 0.05 * rng.standard_normal((k, 2 * d), dtype=np.float32) / np.sqrt(2 * d)
        st[a:b] = pool.stage1[:k] + noise
        lo[a:b] = local[:k]
        ma[a:b] = pool.mask[:k]
        gr[a:b] = gram[:k]
    for arr in (st, lo, ma, gr):
        arr.flush()
    del st, lo, ma, gr
    (folder / f"{name}_ids.json").write_text(json.dumps(list(range(n))))
    files["ids"] = f"{name}_ids.json"
    manifest = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "bundle_id": bundle_id,
        "galleries": {
            name: {
                "n": n,
                "stage1_dim": 2 * d,
                "local_dim": d,
                "max_length": p,
                "dtype": dtype,
                "layout": Layout("float32", dtype).record(),
                "files": files,
            }
        },
        "files": {f: "not-computed-by-bench" for f in files.values()},
    }
    (folder / "index.json").write_text(json.dumps(manifest, indent=2))
    return folder


def _torch_exhaustive(
    model: Any, view: Any, query: Callable[[], Any], text_query: bool, k: int
) -> Callable[[], Any]:
    """Exhaustive PyTorch search: encode the query, ``model.score`` against every gallery item in
    shards, top-k."""
    import torch

    from training.model import Encoded

    d = view.blocks[0].local.shape[2]
    stage1 = (
        np.concatenate([b.stage1 for b in view.blocks]) if len(view.blocks) > 1 else view.blocks[0].stage1
    )

    def run() -> Any:
        with torch.inference_mode():
            q = query()
            parts = []
            for a in range(0, view.n, SHARD):
                b = min(view.n, a + SHARD)
                got = view.gather(np.arange(a, b))  # float32, no copy for an fp32 block
                local, mask, gram = got.local, got.mask, got.gram
                z = torch.zeros(b - a, d)
                g = Encoded(
                    torch.from_numpy(np.asarray(stage1[a:b])),
                    torch.from_numpy(local),
                    torch.from_numpy(mask),
                    torch.from_numpy(gram),
                    z,
                    z,
                )
                parts.append(model.score(g, q)[:, 0] if text_query else model.score(q, g)[0, :])
            return torch.topk(torch.cat(parts), k)

    return run


def ivf_options(n: int, probe_fraction: float = IVF_PROBE_FRACTION) -> dict[str, int]:
    """IVF lists for ``n`` items (the runtime's default count) and the probes covering
    ``probe_fraction`` of them."""
    nlist = default_ivf_nlist(n)
    return {"nlist": nlist, "nprobe": max(1, math.ceil(nlist * probe_fraction))}


def stage1_variant(r: Any, method: str, options: Callable[[int], dict[str, int]] | None = None) -> Any:
    """A Retriever sharing ``r``'s backend and stored arrays, with another stage-1 method
    (``options(n)``: FAISS options for a gallery of ``n`` items).

    Bench only: the copies share the arrays read-only and must not outlive ``r`` or be added to.
    """
    import copy
    import threading

    from mssan_infer import Retriever

    galleries = []
    for g in (r.images, r.texts):
        c = copy.copy(g)
        c.stage1_method, c.faiss_options = method, dict(options(len(g)) if options else {})
        c._lock, c._faiss_n = threading.RLock(), -1
        c._changed()  # nothing derived from the original's rows is shared
        galleries.append(c)
    v = Retriever(
        r.bundle,
        r.backend,
        r.tokenizer,
        galleries[0],
        galleries[1],
        r.search_options,
    )
    v.close = lambda: v._gather_pool.shutdown() if v._gather_pool else None  # the backend stays r's
    return v


def _ivf_options(g: Any) -> dict[str, Any]:
    idx = g.view().faiss_index
    return {"nlist": int(idx.nlist), "nprobe": int(idx.nprobe)} if idx is not None else {}


def _with_blas_threads(fn: Callable[[], Any], n: int, restore: int) -> Callable[[], Any]:
    """``fn`` run with numpy's BLAS at ``n`` threads (stage 1 on one thread: no spinning BLAS workers)."""
    set_threads = numpy_blas_setter()

    def run() -> Any:
        set_threads(n)
        try:
            return fn()
        finally:
            set_threads(restore)

    return run


def query_backend(bundle: Any, threads: int, text_encoder: Path | None = None, options: Any = None) -> Any:
    """An ONNX Runtime backend on ``bundle``'s fp32 graphs and query scorers, its text encoder replaced by
    ``text_encoder`` (the int8 one of the fast path) when given: what ``Retriever.load`` makes with
    ``OnnxRuntimeOptions(threads=threads, precision="int8")`` for a bundle exported with ``--int8``."""
    from mssan_infer import OnnxRuntimeOptions
    from mssan_infer.backends.onnxruntime import OnnxRuntimeBackend
    from mssan_infer.spec import GRAPHS, QUERY_SCORERS

    graphs: dict[str, Any] = {g: bundle.graph_path(g) for g in GRAPHS}
    graphs.update({g: bundle.graph_path(g) for g in QUERY_SCORERS})
    if text_encoder is not None:
        graphs["text_encoder"] = text_encoder
    return OnnxRuntimeBackend(graphs, options if options is not None else OnnxRuntimeOptions(threads=threads))


def fast_path(
    r: Any, lay_int8: Any, threads: int, int8_text_encoder: Path | None, options: Any = None
) -> Any:
    """The fast path: ``lay_int8``'s galleries (the int8 layout) with the int8 text encoder (``None``: the
    fp32 one) on a backend of its own (``options``: its ONNX Runtime options; close it with
    ``.backend.close()``)."""
    from mssan_infer import Retriever

    return Retriever(
        r.bundle,
        query_backend(r.bundle, threads, int8_text_encoder, options),
        r.tokenizer,
        lay_int8.images,
        lay_int8.texts,
        r.search_options,
    )


def _variant(r: Any, threads: int, opts: dict[str, Any]) -> Any:
    """A Retriever on ``r``'s bundle and galleries with other settings (``gather_threads``,
    backend options)."""
    from mssan_infer import OnnxRuntimeOptions, Retriever
    from mssan_infer.backends import create_backend

    opts = dict(opts)
    gather = opts.pop("gather_threads", r.gather_threads)
    be = create_backend(OnnxRuntimeOptions(threads=threads, **opts), r.bundle)
    search = dataclasses.replace(r.search_options, gather_threads=gather)
    return Retriever(r.bundle, be, r.tokenizer, r.images, r.texts, search)


def run_latency(
    retriever_factory: Callable[..., Any],
    model: Any,
    tokenizer: Any,
    pools: dict[str, Any],
    sizes: list[dict[str, Any]],
    depths: list[int],
    work: Path,
    threads: int,
    queries: dict[str, Any],
    repeats_fast: int,
    repeats_slow: int,
    max_seconds: float,
    k: int = 10,
    variant_options: dict[str, dict[str, Any]] | None = None,
    bundle: Path | None = None,
    bandwidth: float | None = None,
    int8_text_encoder: Path | None = None,
    own_processes: int = 0,
    own_queries: int = 200,
) -> dict[str, Any]:
    """Latency per gallery size and direction.

    Args:
        retriever_factory: ``(index=..., mmap=..., local_dtype=...) -> Retriever``.
        pools: ``{"images": Encoded, "texts": Encoded}`` pools to tile galleries from.
        sizes: ``[{"n": 5000, "direction": "t2i", "dtype": "float32", "mmap": False,
            "exhaustive": True}, ...]``.
        queries: ``{"texts": [captions], "images": [Q, R, Dv] array}``.
        variant_options: name -> ONNX Runtime backend options; each adds a ``rerank_100[name]``
            candidate to the fast group (same galleries, another backend).
        bundle, bandwidth: for sizes with ``"layouts": True``, the bundle folder (resident memory is read
            in a fresh process per layout) and the measured memory bandwidth (GB/s).
        int8_text_encoder: the int8 text encoder of the fast path (int8 text encoder + ``int8`` layout),
            timed beside the exact default in the floor group (``bench.floor``) of every size with layouts,
            and at rerank 100 in the slow group; ``None``: the fast path keeps the fp32 text encoder.
        own_processes, own_queries: the floor group's two paths are also searched ``own_queries`` times in
            each of ``own_processes`` fresh processes that hold only that path and its gallery
            (``bench.query_path.own_process``); their figures become the floor rows' end to end
            (``bench.floor.add_own_process``). 0: the section's process only.
    """
    import torch

    from .floor import floor_bandwidth, floor_group, floor_rows

    results: dict[str, Any] = {}
    floor_bw: dict[str, float] | None = None
    for spec in sizes:
        n, direction = int(spec["n"]), spec["direction"]
        n_items = int(spec.get("n_items", n))  # i2t: the captions of n images
        dtype, mmap = spec.get("dtype", "float32"), bool(spec.get("mmap", False))
        text_query = direction == "t2i"
        gname = "images" if text_query else "texts"
        key = f"{direction}_{n}" + (("_fp16mmap" if dtype == "float16" else "_mmap") if mmap else "")
        folder = gallery_folder(work, gname, n_items, spec["bundle_id"], dtype)
        log.info(
            "latency %s: writing/opening the gallery (%d %s, %s%s)",
            key,
            n_items,
            gname,
            dtype,
            ", mmap" if mmap else "",
        )
        gc.collect()
        reset_peak_rss()
        index = write_gallery_index(folder, gname, pools[gname], n_items, dtype, spec["bundle_id"])
        r = retriever_factory(index=index, mmap=mmap, local_dtype=dtype)
        view = (r.images if text_query else r.texts).view()
        rss_after_load = peak_rss_mb()
        qs = queries["texts"] if text_query else queries["images"]
        state = {"i": 0}

        def next_q() -> Any:
            state["i"] += 1
            return qs[state["i"] % len(qs)]

        def search(depth: int) -> Callable[[], Any]:
            if text_query:
                return lambda: r.search(text=next_q(), k=k, rerank=depth)
            return lambda: r.search(image=next_q(), k=k, rerank=depth)

        # breakdown of rerank 100: same work as search(), step by step
        enc = (
            (lambda: r.encode_texts([next_q()])) if text_query else (lambda: r.encode_images(next_q()[None]))
        )
        q_enc = enc()
        rows100 = view.topk(q_enc.stage1, 100)[0][0]
        fast: dict[str, Callable[[], Any]] = {f"rerank_{d}": search(d) for d in depths}
        fast["encode_query"] = enc
        fast["stage1_topk100"] = lambda: view.topk(q_enc.stage1, 100)
        sim = uses_query_scorers(r.backend)  # float32 candidates as their similarities to the query
        q_local = q_enc.local[0, : max(1, extent(q_enc.mask[:1]))]
        fast["gather_100"] = lambda: view.gather(
            rows100, r._gatherer(), r.gather_threads, query=q_local if sim else None
        )
        fast["rerank_step_100"] = lambda: rerank_scores(
            q_enc,
            0,
            view,
            rows100,
            backend_score_fn(r.backend, query_is_text=text_query),
            query_is_text=text_query,
            batch=r.scorer_batch,
            executor=r._gatherer(),
            parts=r.gather_threads,
            similarity=sim,
        )
        log.info("latency %s: fast group", key)
        res_fast = side_by_side(
            fast, repeats=rounds(repeats_fast), warmup=3, max_seconds=max_seconds, block=BLOCK
        )
        # backend settings: their own interleaved group (the default again as the reference), so the
        # extra sessions' threads cannot disturb the depth sweep above
        variants = []
        group: dict[str, Callable[[], Any]] = {"rerank_100": search(100)}
        ivf = None
        if spec.get("ivf"):
            t0 = time.perf_counter()
            ivf = stage1_variant(r, "faiss-ivf", ivf_options)
            (ivf.images if text_query else ivf.texts).view()  # builds (trains) the IVF index
            ivf_build_s = time.perf_counter() - t0
            log.info("latency %s: IVF stage 1 built in %.1f s", key, ivf_build_s)
            group["rerank_100[ivf]"] = (
                (lambda: ivf.search(text=next_q(), k=k, rerank=100))
                if text_query
                else (lambda: ivf.search(image=next_q(), k=k, rerank=100))
            )
        for vname, opts in (variant_options or {}).items():
            opts = dict(opts)
            blas = opts.pop("numpy_threads", None)
            vr = _variant(r, threads, opts) if opts else r
            if opts:
                variants.append(vr)
            call = (
                (lambda vr=vr: vr.search(text=next_q(), k=k, rerank=100))
                if text_query
                else (lambda vr=vr: vr.search(image=next_q(), k=k, rerank=100))
            )
            if blas is not None:
                call = _with_blas_threads(call, int(blas), threads)
            group[f"rerank_100[{vname}]"] = call
        if len(group) > 1:
            log.info("latency %s: backend settings group", key)
            res_var = side_by_side(
                group, repeats=rounds(repeats_fast), warmup=2, max_seconds=max_seconds, block=BLOCK
            )
            res_fast.update({k: v for k, v in res_var.items() if k != "rerank_100"})
            res_fast["rerank_100[default]"] = res_var["rerank_100"]
        lay_rs: dict[str, Any] = {}
        layouts_row: dict[str, Any] = {}
        fast_r: Any = None  # the fast path (int8 text encoder + int8 layout), with the layouts
        own_indexes: dict[str, Path] = {}  # the galleries of the own-process runs (bench.query_path)
        if spec.get("layouts"):
            from .layouts import (
                LAYOUT_NAMES,
                bytes_per_query,
                layout_group,
                layout_index,
                layout_retrievers,
                resident_mb,
            )

            lay_rs = layout_retrievers(r, index, gname, mmap)
            encoded = [
                r.encode_texts([qs[i]]) if text_query else r.encode_images(qs[i][None])
                for i in range(min(10, len(qs)))
            ]
            log.info("latency %s: layouts group", key)
            res_lay = side_by_side(
                layout_group(lay_rs, text_query, next_q, encoded, k),
                repeats=rounds(repeats_fast),
                warmup=2,
                max_seconds=max_seconds,
                block=BLOCK,
            )
            for name in LAYOUT_NAMES:
                lrow: dict[str, Any] = {
                    c: res_lay[f"{c}[{name}]"]
                    for c in ("rerank_100", "no_encode_100", "stage1_topk100", "gather_100", "scorer_100")
                }
                b = bytes_per_query(
                    name,
                    n_items,
                    view.blocks[0].local.shape[2],
                    view.max_length,
                    int(encoded[0].mask.shape[1]),
                )
                lrow["bytes"] = b
                lrow["gb_per_s"] = b["total"] / (lrow["no_encode_100"]["p50_ms"] / 1e3) / 1e9
                if bandwidth:
                    lrow["fraction_of_bandwidth"] = lrow["gb_per_s"] / bandwidth
                g_view = (lay_rs[name].images if text_query else lay_rs[name].texts).view()
                lrow["gallery_bytes"] = g_view.nbytes()
                layouts_row[name] = lrow
            fast_r = fast_path(r, lay_rs["int8"], threads, int8_text_encoder if text_query else None)
            if floor_bw is None:
                floor_bw = floor_bandwidth(bandwidth)
                log.info("latency: floor bandwidth %s GB/s", {k: round(v, 1) for k, v in floor_bw.items()})
            q_enc_file = "text_encoder" if text_query else "image_encoder"
            f_fns, f_meta = floor_group(
                {
                    "fp32": (r, r.bundle.graph_path(q_enc_file)),
                    "int8": (
                        fast_r,
                        int8_text_encoder
                        if text_query and int8_text_encoder
                        else r.bundle.graph_path(q_enc_file),
                    ),
                },
                text_query,
                next_q,
                [qs[i] for i in range(min(10, len(qs)))],
                threads,
                work,
                k,
            )
            log.info("latency %s: floor group", key)
            res_floor = side_by_side(
                f_fns, repeats=rounds(repeats_fast), warmup=2, max_seconds=max_seconds, block=BLOCK
            )
            floor = floor_rows(res_floor, f_meta, floor_bw)
            floor["int8_text_encoder"] = bool(text_query and int8_text_encoder)
            if own_processes and bundle is not None:  # run once this size's galleries are released
                own_indexes = {"fp32": index, "int8": layout_index(index, gname, "int8", mmap)}
            log.info(
                "latency %s: end to end (this process) / floor %s",
                key,
                {p: round(x["floor_ratio"], 2) for p, x in floor["paths"].items()},
            )
            if bundle is not None:
                for name in LAYOUT_NAMES:
                    log.info("latency %s: resident memory of the %s layout (fresh process)", key, name)
                    layouts_row[name]["resident"] = resident_mb(
                        bundle,
                        layout_index(index, gname, name, mmap),
                        name,
                        mmap,
                        text_query,
                        list(queries["texts"]),
                    )
        res_slow: dict[str, Any] = {}
        if spec.get("exhaustive", True):
            from training.model import MSSAN  # noqa: F401  (model is an MSSAN)

            if text_query:

                def tq() -> Any:
                    tok, msk = tokenizer.encode_batch([next_q()])
                    return model.encode_text(torch.from_numpy(tok), torch.from_numpy(msk))
            else:

                def tq() -> Any:
                    x = torch.from_numpy(np.ascontiguousarray(next_q()[None], dtype=np.float32))
                    return model.encode_image(x, torch.ones(x.shape[:2]))

            slow = {
                "rerank_100": search(100),
                "exhaustive_runtime": search(n_items),
                "exhaustive_torch": _torch_exhaustive(model, view, tq, text_query, k),
            }
            if ivf is not None:
                slow["rerank_100_ivf"] = group["rerank_100[ivf]"]
            if lay_rs:
                r8 = fast_r  # the fast path: int8 text encoder + int8 layout
                slow["rerank_100_int8"] = (
                    (lambda: r8.search(text=next_q(), k=k, rerank=100))
                    if text_query
                    else (lambda: r8.search(image=next_q(), k=k, rerank=100))
                )
            log.info("latency %s: slow group (exhaustive)", key)
            res_slow = side_by_side(
                slow,
                repeats=repeats_slow,
                warmup=1,
                max_seconds=max_seconds,
                block={"rerank_100": BLOCK, "rerank_100_ivf": BLOCK, "rerank_100_int8": BLOCK},
            )
        row: dict[str, Any] = {
            "n": n,
            "n_items": n_items,
            "direction": direction,
            "dtype": dtype,
            "mmap": mmap,
            "gallery": gname,
            "fast": res_fast,
            "slow": res_slow,
            "peak_rss_mb": max(rss_after_load, peak_rss_mb()),
            "rss_after_load_mb": rss_after_load,
        }
        if layouts_row:
            row["layouts"] = layouts_row
            row["floor"] = floor
        if res_slow:
            base = res_slow["rerank_100"]["p50_ms"]
            row["speedup_rerank100_vs_exhaustive_torch"] = res_slow["exhaustive_torch"]["p50_ms"] / base
            row["speedup_rerank100_vs_exhaustive_runtime"] = res_slow["exhaustive_runtime"]["p50_ms"] / base
            if "rerank_100_int8" in res_slow:
                row["speedup_rerank100_int8_vs_exhaustive_torch"] = (
                    res_slow["exhaustive_torch"]["p50_ms"] / res_slow["rerank_100_int8"]["p50_ms"]
                )
            row["exhaustive_runtime_vs_torch"] = (
                res_slow["exhaustive_torch"]["p50_ms"] / res_slow["exhaustive_runtime"]["p50_ms"]
            )
            if "rerank_100_ivf" in res_slow:
                row["speedup_rerank100_ivf_vs_exhaustive_torch"] = (
                    res_slow["exhaustive_torch"]["p50_ms"] / res_slow["rerank_100_ivf"]["p50_ms"]
                )
        if ivf is not None:
            row["ivf_build_s"] = ivf_build_s
            row["ivf_options"] = _ivf_options(ivf.images if text_query else ivf.texts)
        results[key] = row
        for vr in variants:
            vr.close()
        for name, vr in lay_rs.items():
            if name != "fp32" and vr._gather_pool is not None:
                vr._gather_pool.shutdown()  # the backend is r's, closed below
        if fast_r is not None:
            fast_r.close()  # its own backend; the galleries are lay_rs["int8"]'s
            fast_r = None
        lay_rs.clear()
        if ivf is not None:
            ivf.close()
            del ivf
        r.close()
        r = view = None  # release the gallery before the next size is built
        gc.collect()
        if own_indexes:
            # each path in processes of its own, while this process holds no gallery: with this size's
            # galleries and sessions still held, most of the fp32 path's own processes ran their encoder
            # several times slower (docs/experiments/2026-12-07-query-threads.md, section 6)
            from .floor import add_own_process
            from .query_path import own_process

            assert bundle is not None
            for p, qp in (("fp32", "exact"), ("int8", "fast")):
                log.info("latency %s: the %s path in %d processes of its own", key, p, own_processes)
                add_own_process(
                    results[key]["floor"]["paths"][p],
                    own_process(
                        bundle,
                        int8_text_encoder,
                        own_indexes[p],
                        qp,
                        processes=own_processes,
                        queries=own_queries,
                        threads=threads,
                        image_queries=not text_query,
                        mmap=mmap,
                    ),
                )
            log.info(
                "latency %s: end to end (own processes) / floor %s",
                key,
                {p: round(x["floor_ratio"], 2) for p, x in results[key]["floor"]["paths"].items()},
            )
    return results
