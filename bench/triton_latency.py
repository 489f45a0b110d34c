"""Triton against its parts: the ``retriever`` model vs in-process ``Retriever.search``, and encoder batching.

    python -m bench.triton_latency [--sizes demo,paper] [--queries 200] [--requests 300] [--json OUT]

For each size (``demo``: the quickstart's tiny preset, D=256, word 128, Dv=256, 200 images;
``paper``: D=1024, word 300, Dv=2048, 1,000 images; random weights: speed does not depend on
them) it exports a bundle, indexes a gallery of 36-region images, writes the default
(``onnxruntime``) Triton repository with the index installed, and serves it with
``mssan_infer.triton.server.local_tritonserver`` (nvidia-pytriton's CPU tritonserver, loopback). The
repository gets two extra models made from the generated ones: ``retriever_bls`` (the
retriever with ``graphs: bls``: encoders and scorer called through BLS) and
``text_encoder_nobatch`` / ``image_encoder_nobatch`` (no dynamic batching).

1. Latency, text -> image, ``k=10, rerank=100``, one query at a time, the modes interleaved
   query by query: in-process ``Retriever.search`` (same bundle, gallery and ONNX Runtime
   threads), the ``retriever`` model (``graphs: local``, the default on a CPU server) and
   ``retriever_bls``, each over HTTP. Server time is Triton's own per-request figure
   (``/v2/models/.../stats``: queue + compute, mean) and the ratio is against the in-process mean.
2. Load: ``tritonclient.http.aio`` clients at concurrency 1, 2, 4, 8 (each a fixed number of
   requests): throughput, p50, p99 for the two retriever models, and the encoders with and
   without dynamic batching (one item per request, fixed shapes so requests can batch).

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
from typing import Any, Callable

import numpy as np

from mssan_infer import OnnxRuntimeOptions

SIZES = {
    "demo": {"d": 256, "word_dim": 128, "dv": 256, "images": 200},
    "paper": {"d": 1024, "word_dim": 300, "dv": 2048, "images": 1000},
}
CONCURRENCY = (1, 2, 4, 8)


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(statistics.fmean(a)),
        "n": len(xs),
    }


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _server_ms(stats_before: dict[str, Any], stats_after: dict[str, Any]) -> float:
    """Mean server time per request between two ``get_inference_statistics`` snapshots (queue + compute)."""

    def part(s: dict[str, Any], k: str) -> tuple[int, int]:
        v = s["model_stats"][0]["inference_stats"][k]
        return int(v["count"]), int(v["ns"])

    n = part(stats_after, "success")[0] - part(stats_before, "success")[0]
    ns = part(stats_after, "success")[1] - part(stats_before, "success")[1]
    return ns / max(1, n) / 1e6


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


def latency_part(
    local: Any, url: str, server_pid: int, models: tuple[str, ...], queries: list[str], rerank: int
) -> dict[str, Any]:
    """One query at a time, the modes interleaved query by query: wall time per request (client side),
    Triton's mean server time, and CPU seconds per query (in this process for the in-process search; all
    processes of the server's group for a model) -- the last does not depend on how busy the machine is."""
    import tritonclient.http as hc

    client = hc.InferenceServerClient(url, network_timeout=120)
    try:
        for q in queries[:20]:
            local.search(text=q, k=10, rerank=rerank)
            for m in models:
                client.infer(m, _retriever_inputs(hc, q, 10, rerank))
        pids = _group_pids(os.getpgid(server_pid))
        before = {m: client.get_inference_statistics(m) for m in models}
        times: dict[str, list[float]] = {"in_process": [], **{m: [] for m in models}}
        cpu = {k: 0.0 for k in times}
        for q in queries[20:]:
            t0, c0 = time.perf_counter(), time.process_time()
            local.search(text=q, k=10, rerank=rerank)
            times["in_process"].append(time.perf_counter() - t0)
            cpu["in_process"] += time.process_time() - c0
            for m in models:
                inputs = _retriever_inputs(hc, q, 10, rerank)
                c0 = _cpu_s(pids)
                t0 = time.perf_counter()
                client.infer(m, inputs)
                times[m].append(time.perf_counter() - t0)
                cpu[m] += _cpu_s(pids) - c0
        after = {m: client.get_inference_statistics(m) for m in models}
    finally:
        client.close()
    lat = {k: {**_pct(v), "cpu_ms_per_query": cpu[k] / len(v) * 1e3} for k, v in times.items()}
    ref = lat["in_process"]
    for m in models:
        lat[m]["server_mean_ms"] = _server_ms(before[m], after[m])
        lat[m]["server_vs_in_process"] = lat[m]["server_mean_ms"] / ref["mean_ms"]
        lat[m]["p50_vs_in_process"] = lat[m]["p50_ms"] / ref["p50_ms"]
        lat[m]["cpu_vs_in_process"] = lat[m]["cpu_ms_per_query"] / max(1e-9, ref["cpu_ms_per_query"])
    return lat


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
    p50/p99."""
    import tritonclient.http.aio as aio

    client = aio.InferenceServerClient(url, conn_limit=max(concurrency, 4))
    try:
        for i in range(min(10, requests)):  # warm-up
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

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "throughput_per_s": len(lat) / wall, **_pct(lat)}


def run_size(
    name: str, work: Path, *, queries_n: int, requests: int, rerank: int, threads: int
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
    write_repository(bundle, TritonSettings(threads=threads), out=repo)
    install_index(repo, index)
    _derive_models(repo)
    queries = random_captions(queries_n + 20, words=8, seed=2)
    fixed = random_captions(64, words=12, seed=3)
    tok = np.array([local.tokenize([c])[0] for c in fixed], np.int64)  # [64, 12]
    regions = random_regions(64, 36, size["dv"], seed=4)
    out: dict[str, Any] = {
        "size": {**size, "rerank": rerank, "k": 10, "threads": threads},
        "load_before": _load(),
    }
    with local_tritonserver(repo, startup_timeout_s=300) as server:
        models = ("retriever", "retriever_bls")
        out["latency"] = latency_part(local, server.http_url, server.pid, models, queries, rerank)
        # 2. load at each concurrency
        load: dict[str, list[dict[str, float]]] = {}
        load["in_process"] = [_inprocess_load(local, queries, c, requests, rerank) for c in CONCURRENCY]
        for m in models:
            load[m] = [
                asyncio.run(
                    _load_run(
                        server.http_url,
                        m,
                        lambda mod, i: _retriever_inputs(mod, queries[i % len(queries)], 10, rerank),
                        c,
                        requests,
                    )
                )
                for c in CONCURRENCY
            ]
        for enc in ("text_encoder", "image_encoder"):
            for variant in (enc, f"{enc}_nobatch"):
                load[variant] = [
                    asyncio.run(
                        _load_run(
                            server.http_url,
                            variant,
                            lambda mod, i, e=enc: _encoder_inputs(
                                mod, e, tok[i % 64 : i % 64 + 1], regions[i % 64 : i % 64 + 1]
                            ),
                            c,
                            requests,
                        )
                    )
                    for c in CONCURRENCY
                ]
        out["load"] = load
    local.close()
    out["load_after"] = _load()
    return out


def _print(name: str, res: dict[str, Any]) -> None:
    print(f"\n== {name}: {res['size']}  (load {res['load_before']} -> {res['load_after']})")
    lat = res["latency"]
    print(
        f"{'mode':<16}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'CPU ms/q':>10}{'server ms':>11}"
        f"{'server/in-proc':>16}{'p50/in-proc':>13}{'CPU/in-proc':>13}"
    )
    for m, v in lat.items():
        srv = (
            f"{v['server_mean_ms']:>11.2f}{v['server_vs_in_process']:>15.2f}x{v['p50_vs_in_process']:>12.2f}x"
            f"{v['cpu_vs_in_process']:>12.2f}x"
            if "server_mean_ms" in v
            else ""
        )
        print(
            f"{m:<16}{v['p50_ms']:>9.2f}{v['p99_ms']:>9.2f}{v['mean_ms']:>9.2f}{v['cpu_ms_per_query']:>10.2f}{srv}"
        )
    print(f"{'load':<22}" + "".join(f"{'c=' + str(c):>24}" for c in CONCURRENCY))
    for m, rows in res["load"].items():
        cells = "".join(
            f"{r['throughput_per_s']:>8.1f}/s {r['p50_ms']:>5.1f}/{r['p99_ms']:>6.1f}" for r in rows
        )
        print(f"{m:<22}{cells}")
    print("(load rows: throughput, p50/p99 ms)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="demo,paper", help="comma-separated: demo, paper")
    ap.add_argument("--queries", type=int, default=200, help="queries per mode in the latency part")
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
    work = args.work or Path(tempfile.mkdtemp(prefix="mssan-triton-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"cpus": os.cpu_count()}
    for name in args.sizes.split(","):
        results[name] = run_size(
            name,
            work,
            queries_n=args.queries,
            requests=args.requests,
            rerank=args.rerank,
            threads=args.threads,
        )
        _print(name, results[name])
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
