"""Latency of one text->image query: in-process ONNX Runtime vs Triton (HTTP, gRPC), same gallery.

    python bench/triton_latency.py [--images 1000] [--queries 200] [--json out.json]

Builds a tiny random model (D=32) and bundle, a gallery of ``--images`` images
(36 regions), serves the bundle's repository (``python`` flavour: the only one
the tritonserver of nvidia-pytriton can run) on 127.0.0.1, and times
``search(text=..., k=10, rerank=100)``:

- ``onnxruntime``: ``Retriever.load(bundle)`` in process;
- ``triton-http`` / ``triton-grpc``: ``Retriever.load(bundle, backend="triton")``
  (stage 1 local; text encoder and scorer on the server: two round trips);
- ``bls-http`` / ``bls-grpc``: one request to the ``retriever`` model (everything on the server).

Prints p50/p99 per mode (ms). Numbers depend on the machine; on a small shared
CPU box they mostly measure request overhead, since the tiny model computes in
well under a millisecond.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(statistics.fmean(a)), "n": len(xs)}


def _time(fn: Callable[[str], Any], queries: list[str], warmup: int = 20) -> dict[str, float]:
    for q in queries[:warmup]:
        fn(q)
    out = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        out.append(time.perf_counter() - t0)
    return _percentiles(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (local and server)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import tritonclient.grpc as gc
    import tritonclient.http as hc
    from export import export_bundle
    from export.triton import TritonSettings, install_index, write_repository
    from export.triton_server import local_tritonserver
    from mssan_infer import Retriever
    from mssan_infer.tokenizer import Tokenizer, build_vocab
    from training.checkpoint import save_checkpoint
    from training.config import ModelConfig
    from training.model import MSSAN

    words = ("a the and of on in with near red blue green yellow black white dog cat ball tree car "
             "man woman bird boat house runs sits big small beach street field").split()
    work = Path(tempfile.mkdtemp(prefix="mssan-bench-"))
    torch.manual_seed(0)
    tok = Tokenizer(build_vocab([" ".join(words)] * 4, threshold=4), max_len=32)
    cfg = ModelConfig(vocab_size=len(tok), word_dim=16, embed_size=32, img_dim=24, max_len=32)
    ckpt = save_checkpoint(work / "ckpt", MSSAN(cfg), tok, state={"epoch": 0})
    bundle = export_bundle(ckpt, work / "bundle")
    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((args.images, 36, 24))).astype(np.float32)
    local = Retriever.load(bundle, threads=args.threads)
    local.add_images(feats)
    local.save(work / "index")
    repo = work / "repo"
    write_repository(bundle, TritonSettings(backend="python", threads=args.threads), out=repo)
    install_index(repo, work / "index")
    queries = [" ".join(rng.choice(words, size=int(rng.integers(4, 12)))) for _ in range(args.queries)]
    results: dict[str, Any] = {"images": args.images, "rerank": args.rerank, "k": 10, "threads": args.threads}

    results["onnxruntime"] = _time(lambda q: local.search(text=q, k=10, rerank=args.rerank), queries)
    with local_tritonserver(repo) as server:
        for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with Retriever.load(bundle, backend="triton", url=url, protocol=proto, index=work / "index") as r:
                results[f"triton-{proto}"] = _time(lambda q: r.search(text=q, k=10, rerank=args.rerank), queries)
            mod = hc if proto == "http" else gc
            client = mod.InferenceServerClient(url)

            def bls(q: str, mod: Any = mod, client: Any = client) -> Any:
                t = mod.InferInput("text", [1], "BYTES")
                t.set_data_from_numpy(np.array([q], dtype=object))
                k = mod.InferInput("k", [1], "INT32")
                k.set_data_from_numpy(np.array([10], np.int32))
                rr = mod.InferInput("rerank", [1], "INT32")
                rr.set_data_from_numpy(np.array([args.rerank], np.int32))
                return client.infer("retriever", [t, k, rr])

            results[f"bls-{proto}"] = _time(bls, queries)
            client.close()
    local.close()
    width = max(len(k) for k in results)
    for name, v in results.items():
        if isinstance(v, dict):
            print(f"{name:<{width}}  p50 {v['p50_ms']:7.2f} ms   p99 {v['p99_ms']:7.2f} ms   (n={v['n']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
