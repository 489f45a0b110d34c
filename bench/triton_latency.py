"""Triton against its parts: the ``retriever`` model vs in-process ``Retriever.search``, and encoder batching.

    python -m bench.triton_latency [--sizes demo,paper] [--queries 200] [--block 20] [--requests 300]
                                   [--json OUT]

For each size (``demo``: the quickstart's tiny preset, D=256, word 128, Dv=256, 200 images;
``paper``: D=1024, word 300, Dv=2048, 1,000 images; random weights: speed does not depend on
them) it exports a bundle, indexes a gallery of 36-region images, writes the default
(``onnxruntime``) Triton repository with the index installed, and serves it with
``mssan_infer.triton.server.local_tritonserver`` (nvidia-pytriton's CPU tritonserver, loopback). The
repository gets two extra models made from the generated ones: ``retriever_bls`` (the
retriever with ``graphs: bls``: encoders and scorer called through BLS) and
``text_encoder_nobatch`` / ``image_encoder_nobatch`` (no dynamic batching).

One method times every mode, in-process and server alike: **blocks, each with the other side
idle.** The queries are split into blocks (``--block``); every mode runs every block (the same
queries, in the same order), the order of the modes rotated from block to block so that drift in
the machine's load reaches them all. Before each block the bench waits until nothing else of the
bench uses the CPU (the server's processes and this process, from ``/proc``: see
:func:`wait_idle`), runs the same untimed warm-up calls, then times the block's queries back to
back. So the in-process search is timed with the server running but idle, and the server with the
in-process runtime idle. It does not interleave query by query: numpy's OpenBLAS keeps a worker
spinning on a core for about 0.1 s after each matrix product (its ``THREAD_TIMEOUT``), in this
process after a search and in the retriever's stub after a request, so a call timed right after
the other side's call shares the 2 cores with that spinner and measures the contention instead
(the interleaved runs before this change gave the in-process search 5-9x its own time).

1. Latency, text -> image, ``k=10, rerank=100``, one query at a time: in-process
   ``Retriever.search`` (same bundle, gallery and ONNX Runtime threads), the ``retriever`` model
   (``graphs: local``, the default on a CPU server) and ``retriever_bls``, each over HTTP: p50,
   p99, mean, throughput (queries per second, one at a time), CPU per query (this process for the
   in-process search; every process of the server's group for a model), and Triton's own server
   time (``/v2/models/.../stats``: queue + compute, mean over the timed queries). The ratios are
   against the in-process search of the same run. The in-process search is also timed with the
   same blocks before the server starts (``latency_server_stopped``).
2. Load: ``tritonclient.http.aio`` clients at concurrency 1, 2, 4, 8 (each a fixed number of
   requests, after the same warm-up and idle wait): throughput, p50, p99 for the in-process
   search (threads), the two retriever models, and the encoders with and without dynamic batching
   (one item per request, fixed shapes so requests can batch).
3. Consistency: each mode's p50 in the latency part against its load run at concurrency 1 (the
   same calls one at a time, timed by another loop) and the in-process search with the server
   idle against the server stopped; a ratio outside ``1/1.5..1.5`` is printed as a disagreement.

Everything runs on this machine's CPU: note its load (printed) beside the figures. Results go
to ``--json`` (nothing is written to ``bench/results`` unless you pass that path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mssan_infer import OnnxRuntimeOptions

SIZES = {
    "demo": {"d": 256, "word_dim": 128, "dv": 256, "images": 200},
    "paper": {"d": 1024, "word_dim": 300, "dv": 2048, "images": 1000},
}
CONCURRENCY = (1, 2, 4, 8)
WARMUP = 3  # untimed calls before each block and each load run (the same queries for every mode)
AGREE = 1.5  # two timings of the same calls agree when their ratio is within 1/AGREE..AGREE
METHOD = (
    "blocks with the other side idle: every mode runs the same blocks of queries back to back, the "
    "order of modes rotated per block; before each block the bench waits until the server's "
    "processes and this process are idle, then runs the same untimed warm-up"
)


def _pct(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(statistics.fmean(a)),
        "n": len(xs),
    }


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _success(stats: dict[str, Any]) -> tuple[int, int]:
    """Requests and server nanoseconds (queue + compute) so far, from ``get_inference_statistics``."""
    v = stats["model_stats"][0]["inference_stats"]["success"]
    return int(v["count"]), int(v["ns"])


def _group_pids(pgid: int) -> list[int]:
    """Processes of a process group (the server and its Python backend stubs)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(d.name))
    return pids


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def wait_idle(
    cpu_s: Callable[[], float],
    *,
    window_s: float = 0.1,
    threshold: float = 0.2,
    timeout_s: float = 5.0,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[float, bool]:
    """Wait until the processes behind ``cpu_s`` (CPU seconds so far) use under ``threshold`` of a core
    over a ``window_s`` window. Returns (seconds waited, whether they went idle before ``timeout_s``).

    A search leaves OpenBLAS workers spinning for a while after it returns; the next timed call must
    not share the cores with them. (``/proc`` counts CPU time in ticks of 10 ms: the window holds
    several, and the threshold lets one tick of background work through.)"""
    t_start = clock()
    while True:
        c0, t0 = cpu_s(), clock()
        sleep(window_s)
        busy = (cpu_s() - c0) / max(1e-9, clock() - t0)
        if busy < threshold:
            return clock() - t_start, True
        if clock() - t_start >= timeout_s:
            return clock() - t_start, False


def block_plan(modes: Sequence[str], n_queries: int, block: int) -> list[tuple[str, int, int]]:
    """The run order: ``(mode, start, stop)`` for each block of ``block`` queries (the last may be
    shorter) and each mode. Every mode runs every block once; the modes' order is rotated by one from
    block to block."""
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    plan = []
    for b, start in enumerate(range(0, n_queries, block)):
        stop = min(n_queries, start + block)
        for i in range(len(modes)):
            plan.append((modes[(b + i) % len(modes)], start, stop))
    return plan


def timed_blocks(
    calls: Mapping[str, Callable[[str], Any]],
    queries: Sequence[str],
    warmup: Sequence[str],
    *,
    block: int,
    cpu: Mapping[str, Callable[[], float]],
    idle_cpu: Callable[[], float],
    server_stats: Mapping[str, Callable[[], tuple[int, int]]] | None = None,
    settle: Callable[[Callable[[], float]], tuple[float, bool]] = wait_idle,
) -> dict[str, dict[str, Any]]:
    """Time ``calls[mode](query)`` for every mode over the same ``queries`` in blocks
    (:func:`block_plan`): before each block, wait until ``idle_cpu`` shows nothing running
    (``settle``), run ``warmup`` untimed, then time the block one query at a time.

    ``cpu[mode]()`` is the CPU seconds so far of whatever does the mode's work (read around each
    call); ``server_stats[mode]()``, where given, is the server's cumulative (requests, nanoseconds)
    for the mode, read around each timed block so that the warm-up is left out.

    Returns, per mode: ``times`` (seconds per query, in query order), ``cpu_s`` (total), ``server``
    (requests, ns) when measured, ``waits_s`` (the idle waits) and ``idle`` (every wait ended idle)."""
    out: dict[str, dict[str, Any]] = {
        m: {"times": [0.0] * len(queries), "cpu_s": 0.0, "waits_s": [], "idle": True} for m in calls
    }
    server = {m: [0, 0] for m in (server_stats or {})}
    for mode, start, stop in block_plan(list(calls), len(queries), block):
        call, rec = calls[mode], out[mode]
        waited, idle = settle(idle_cpu)
        rec["waits_s"].append(waited)
        rec["idle"] = rec["idle"] and idle
        for q in warmup:
            call(q)
        s0 = server_stats[mode]() if server_stats and mode in server_stats else None
        for i in range(start, stop):
            c0 = cpu[mode]()
            t0 = time.perf_counter()
            call(queries[i])
            rec["times"][i] = time.perf_counter() - t0
            rec["cpu_s"] += cpu[mode]() - c0
        if s0 is not None and server_stats is not None:
            s1 = server_stats[mode]()
            server[mode][0] += s1[0] - s0[0]
            server[mode][1] += s1[1] - s0[1]
    for m, (n, ns) in server.items():
        out[m]["server"] = (n, ns)
    return out


def summarize(raw: Mapping[str, Mapping[str, Any]], ref: str = "in_process") -> dict[str, dict[str, Any]]:
    """Per-mode figures from :func:`timed_blocks`: percentiles, throughput one at a time, CPU per query,
    server time, and each mode's ratios to ``ref`` (the keys the committed results use)."""
    lat: dict[str, dict[str, Any]] = {}
    for m, r in raw.items():
        times = r["times"]
        lat[m] = {
            **_pct(times),
            "throughput_per_s": len(times) / max(1e-12, sum(times)),
            "cpu_ms_per_query": r["cpu_s"] / len(times) * 1e3,
            "idle_wait_ms_mean": float(statistics.fmean(r["waits_s"])) * 1e3 if r["waits_s"] else 0.0,
            "idle_before_every_block": bool(r["idle"]),
        }
        if "server" in r:
            n, ns = r["server"]
            lat[m]["server_mean_ms"] = ns / max(1, n) / 1e6
    if ref in lat:
        base = lat[ref]
        for m, v in lat.items():
            if m == ref:
                continue
            if "server_mean_ms" in v:
                v["server_vs_in_process"] = v["server_mean_ms"] / base["mean_ms"]
            v["p50_vs_in_process"] = v["p50_ms"] / base["p50_ms"]
            v["throughput_vs_in_process"] = v["throughput_per_s"] / base["throughput_per_s"]
            v["cpu_vs_in_process"] = v["cpu_ms_per_query"] / max(1e-9, base["cpu_ms_per_query"])
    return lat


def consistency(
    latency: Mapping[str, Mapping[str, Any]],
    load: Mapping[str, Sequence[Mapping[str, Any]]],
    server_stopped: Mapping[str, Mapping[str, Any]] | None = None,
    tolerance: float = AGREE,
) -> dict[str, dict[str, Any]]:
    """Do two timings of the same calls agree? Each mode's latency-part p50 against its load run at
    concurrency 1, and the in-process search with the server idle against the server stopped.
    ``ratio`` is the other timing over the latency part's; ``agree`` when within 1/tolerance..tolerance."""

    def entry(a: float, b: float, what: str) -> dict[str, Any]:
        ratio = b / a if a > 0 else float("inf")
        return {"latency_p50_ms": a, what: b, "ratio": ratio, "agree": 1 / tolerance <= ratio <= tolerance}

    out: dict[str, dict[str, Any]] = {}
    for m, v in latency.items():
        c1 = [r for r in load.get(m, ()) if r["concurrency"] == 1]
        if c1:
            out[m] = entry(v["p50_ms"], c1[0]["p50_ms"], "load_c1_p50_ms")
    if server_stopped and "in_process" in server_stopped and "in_process" in latency:
        out["in_process_server_stopped"] = entry(
            latency["in_process"]["p50_ms"], server_stopped["in_process"]["p50_ms"], "server_stopped_p50_ms"
        )
    return out


def latency_part(
    local: Any,
    url: str,
    server_pid: int,
    models: tuple[str, ...],
    queries: list[str],
    warmup: list[str],
    rerank: int,
    block: int,
) -> dict[str, Any]:
    """The latency part (1. in the module's docstring) with the server up: the in-process search and
    each model, timed by :func:`timed_blocks`."""
    import tritonclient.http as hc

    client = hc.InferenceServerClient(url, network_timeout=120)
    try:
        pids = _group_pids(os.getpgid(server_pid))

        def server_cpu() -> float:
            return _cpu_s(pids)

        def stats(m: str) -> Callable[[], tuple[int, int]]:
            return lambda: _success(client.get_inference_statistics(m))

        def infer(m: str) -> Callable[[str], Any]:
            return lambda q: client.infer(m, _retriever_inputs(hc, q, 10, rerank))

        calls: dict[str, Callable[[str], Any]] = {
            "in_process": lambda q: local.search(text=q, k=10, rerank=rerank),
            **{m: infer(m) for m in models},
        }
        raw = timed_blocks(
            calls,
            queries,
            warmup,
            block=block,
            cpu={"in_process": time.process_time, **{m: server_cpu for m in models}},
            idle_cpu=lambda: server_cpu() + time.process_time(),
            server_stats={m: stats(m) for m in models},
        )
    finally:
        client.close()
    return summarize(raw)


def _derive_models(repo: Path) -> None:
    """``retriever_bls`` (graphs: bls) and ``*_nobatch`` encoders (no dynamic batching) beside the
    generated models."""
    src = repo / "retriever"
    dst = repo / "retriever_bls"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("index"))
    os.symlink((src / "1" / "index").resolve(), dst / "1" / "index")
    cfg = (dst / "config.pbtxt").read_text()
    cfg = cfg.replace('name: "retriever"', 'name: "retriever_bls"', 1)
    cfg = re.sub(r'(key: "graphs"\s*value: \{ string_value: )"[a-z]+"', r'\1"bls"', cfg)
    (dst / "config.pbtxt").write_text(cfg)
    for enc in ("text_encoder", "image_encoder"):
        d = repo / f"{enc}_nobatch"
        shutil.copytree(repo / enc, d)
        cfg = (d / "config.pbtxt").read_text().replace(f'name: "{enc}"', f'name: "{enc}_nobatch"', 1)
        cfg = re.sub(r"dynamic_batching \{[^}]*\}\n", "", cfg)
        (d / "config.pbtxt").write_text(cfg)


def _retriever_inputs(mod: Any, text: str, k: int, rerank: int) -> list[Any]:
    t = mod.InferInput("text", [1], "BYTES")
    t.set_data_from_numpy(np.array([text], dtype=object))
    kk = mod.InferInput("k", [1], "INT32")
    kk.set_data_from_numpy(np.array([k], np.int32))
    rr = mod.InferInput("rerank", [1], "INT32")
    rr.set_data_from_numpy(np.array([rerank], np.int32))
    return [t, kk, rr]


def _encoder_inputs(mod: Any, enc: str, tokens: np.ndarray, regions: np.ndarray) -> list[Any]:
    if enc.startswith("text"):
        a, b = (
            mod.InferInput("tokens", list(tokens.shape), "INT64"),
            mod.InferInput("token_mask", list(tokens.shape), "FP32"),
        )
        a.set_data_from_numpy(tokens)
        b.set_data_from_numpy(np.ones(tokens.shape, np.float32))
    else:
        a = mod.InferInput("regions", list(regions.shape), "FP32")
        b = mod.InferInput("region_mask", list(regions.shape[:2]), "FP32")
        a.set_data_from_numpy(regions)
        b.set_data_from_numpy(np.ones(regions.shape[:2], np.float32))
    return [a, b]


async def _load_run(
    url: str, model: str, make: Callable[[Any, int], list[Any]], concurrency: int, requests: int
) -> dict[str, float]:
    """``requests`` requests to ``model`` from ``concurrency`` concurrent async clients: throughput,
    p50/p99 (after the same number of warm-up calls as the in-process run)."""
    import tritonclient.http.aio as aio

    client = aio.InferenceServerClient(url, conn_limit=max(concurrency, 4))
    try:
        for i in range(min(WARMUP, requests)):
            await client.infer(model, make(aio, i))
        lat: list[float] = []
        counter = iter(range(requests))

        async def worker() -> None:
            for i in counter:
                t0 = time.perf_counter()
                await client.infer(model, make(aio, i))
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return {"concurrency": concurrency, "throughput_per_s": len(lat) / wall, **_pct(lat)}


def _inprocess_load(
    r: Any, queries: list[str], concurrency: int, requests: int, rerank: int
) -> dict[str, float]:
    """The same load on an in-process Retriever from ``concurrency`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    lat: list[float] = []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        r.search(text=queries[i % len(queries)], k=10, rerank=rerank)
        lat.append(time.perf_counter() - t0)

    for i in range(min(WARMUP, requests)):
        r.search(text=queries[i % len(queries)], k=10, rerank=rerank)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "throughput_per_s": len(lat) / wall, **_pct(lat)}


def run_size(
    name: str, work: Path, *, queries_n: int, requests: int, rerank: int, threads: int, block: int
) -> dict[str, Any]:
    from bench.fixtures import random_captions, random_regions, speed_bundle
    from export.triton import TritonSettings, install_index, write_repository
    from mssan_infer import Retriever
    from mssan_infer.triton.server import local_tritonserver

    size = SIZES[name]
    bundle = speed_bundle(work, size["d"], size["word_dim"], size["dv"])
    local = Retriever.load(bundle, OnnxRuntimeOptions(threads=threads or None))
    local.add_images(
        random_regions(size["images"], 36, size["dv"], seed=1), ids=[f"img{i}" for i in range(size["images"])]
    )
    index = work / f"index-{name}"
    shutil.rmtree(index, ignore_errors=True)
    local.save(index)
    repo = work / f"repo-{name}"
    shutil.rmtree(repo, ignore_errors=True)
    write_repository(bundle, TritonSettings(threads=threads), out=repo)
    install_index(repo, index)
    _derive_models(repo)
    all_queries = random_captions(queries_n + WARMUP, words=8, seed=2)
    warmup, queries = all_queries[:WARMUP], all_queries[WARMUP:]
    fixed = random_captions(64, words=12, seed=3)
    tok = np.array([local.tokenize([c])[0] for c in fixed], np.int64)  # [64, 12]
    regions = random_regions(64, 36, size["dv"], seed=4)
    out: dict[str, Any] = {
        "size": {**size, "rerank": rerank, "k": 10, "threads": threads},
        "method": METHOD,
        "block": block,
        "load_before": _load(),
    }
    # the in-process search before the server exists: the same blocks, the same warm-up
    out["latency_server_stopped"] = summarize(
        timed_blocks(
            {"in_process": lambda q: local.search(text=q, k=10, rerank=rerank)},
            queries,
            warmup,
            block=block,
            cpu={"in_process": time.process_time},
            idle_cpu=time.process_time,
        )
    )
    with local_tritonserver(repo, startup_timeout_s=300) as server:
        pids = _group_pids(os.getpgid(server.pid))

        def settle() -> None:
            wait_idle(lambda: _cpu_s(pids) + time.process_time())

        models = ("retriever", "retriever_bls")
        out["latency"] = latency_part(
            local, server.http_url, server.pid, models, queries, warmup, rerank, block
        )

        # 2. load at each concurrency, each run starting with the server and this process idle
        def retriever_inputs(mod: Any, i: int) -> list[Any]:
            return _retriever_inputs(mod, queries[i % len(queries)], 10, rerank)

        def encoder_inputs(enc: str) -> Callable[[Any, int], list[Any]]:
            return lambda mod, i: _encoder_inputs(
                mod, enc, tok[i % 64 : i % 64 + 1], regions[i % 64 : i % 64 + 1]
            )

        def served(model: str, make: Callable[[Any, int], list[Any]]) -> list[dict[str, float]]:
            rows = []
            for c in CONCURRENCY:
                settle()
                rows.append(asyncio.run(_load_run(server.http_url, model, make, c, requests)))
            return rows

        load: dict[str, list[dict[str, float]]] = {"in_process": []}
        for c in CONCURRENCY:
            settle()
            load["in_process"].append(_inprocess_load(local, queries, c, requests, rerank))
        for m in models:
            load[m] = served(m, retriever_inputs)
        for enc in ("text_encoder", "image_encoder"):
            for variant in (enc, f"{enc}_nobatch"):
                load[variant] = served(variant, encoder_inputs(enc))
        out["load"] = load
    local.close()
    out["consistency"] = consistency(out["latency"], out["load"], out["latency_server_stopped"])
    out["load_after"] = _load()
    return out


def _print(name: str, res: dict[str, Any]) -> None:
    print(f"\n== {name}: {res['size']}  (load {res['load_before']} -> {res['load_after']})")
    print(f"method: {res['method']}; blocks of {res['block']} queries")
    lat = res["latency"]
    print(
        f"{'mode':<16}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'q/s':>8}{'CPU ms/q':>10}{'server ms':>11}"
        f"{'server/in-proc':>16}{'p50/in-proc':>13}{'q/s /in-proc':>14}{'CPU/in-proc':>13}"
    )
    for m, v in lat.items():
        srv = (
            f"{v['server_mean_ms']:>11.2f}{v['server_vs_in_process']:>15.2f}x{v['p50_vs_in_process']:>12.2f}x"
            f"{v['throughput_vs_in_process']:>13.2f}x{v['cpu_vs_in_process']:>12.2f}x"
            if "server_mean_ms" in v
            else ""
        )
        print(
            f"{m:<16}{v['p50_ms']:>9.2f}{v['p99_ms']:>9.2f}{v['mean_ms']:>9.2f}{v['throughput_per_s']:>8.1f}"
            f"{v['cpu_ms_per_query']:>10.2f}{srv}"
        )
    stopped = res["latency_server_stopped"]["in_process"]
    print(
        f"{'(server stopped)':<16}{stopped['p50_ms']:>9.2f}{stopped['p99_ms']:>9.2f}"
        f"{stopped['mean_ms']:>9.2f}{stopped['throughput_per_s']:>8.1f}{stopped['cpu_ms_per_query']:>10.2f}"
    )
    print(f"{'load':<22}" + "".join(f"{'c=' + str(c):>24}" for c in CONCURRENCY))
    for m, rows in res["load"].items():
        cells = "".join(
            f"{r['throughput_per_s']:>8.1f}/s {r['p50_ms']:>5.1f}/{r['p99_ms']:>6.1f}" for r in rows
        )
        print(f"{m:<22}{cells}")
    print("(load rows: throughput, p50/p99 ms)")
    for m, c in res["consistency"].items():
        other = c.get("load_c1_p50_ms", c.get("server_stopped_p50_ms"))
        what = "load c=1" if "load_c1_p50_ms" in c else "server stopped"
        verdict = "agree" if c["agree"] else f"DISAGREE (beyond {AGREE}x)"
        print(
            f"consistency {m}: latency p50 {c['latency_p50_ms']:.2f} ms, {what} {other:.2f} ms "
            f"({c['ratio']:.2f}x): {verdict}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="demo,paper", help="comma-separated: demo, paper")
    ap.add_argument("--queries", type=int, default=200, help="timed queries per mode in the latency part")
    ap.add_argument(
        "--block",
        type=int,
        default=20,
        help="queries per block in the latency part (each mode runs each block, the other side idle)",
    )
    ap.add_argument(
        "--requests", type=int, default=300, help="requests per model and concurrency in the load part"
    )
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads, here and on the server (0: its default)",
    )
    ap.add_argument(
        "--work", type=Path, default=None, help="cache folder for bundles (default: a temp folder)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.block < 1 or args.queries < 1:
        ap.error("--queries and --block must be at least 1")
    work = args.work or Path(tempfile.mkdtemp(prefix="mssan-triton-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"cpus": os.cpu_count()}
    for name in args.sizes.split(","):
        if name not in SIZES:
            ap.error(f"unknown size {name!r}: choose from {', '.join(SIZES)}")
        results[name] = run_size(
            name,
            work,
            queries_n=args.queries,
            requests=args.requests,
            rerank=args.rerank,
            threads=args.threads,
            block=args.block,
        )
        _print(name, results[name])
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
