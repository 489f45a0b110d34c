"""``python -m bench [--quick]``: run the benchmark sections and write bench/results/.

Thread counts: every candidate runs with ``--threads`` intra-op threads
(PyTorch ``set_num_threads``, ONNX Runtime ``intra_op_num_threads``, numpy's
OpenBLAS through threadpoolctl when installed). ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` are removed from this process's environment before numpy
loads (they pin OpenBLAS to slower kernels on some machines); pass
``--keep-openblas-env`` to keep them. Tests and CI never change them.
``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` in this process (set it to override).
"""

from __future__ import annotations

import os
import sys

_REMOVED_ENV = {}
if "--keep-openblas-env" not in sys.argv:
    for _k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if _k in os.environ:
            _REMOVED_ENV[_k] = os.environ.pop(_k)
# PyTorch's OpenMP workers spin-wait by default; on a shared CPU a spinning worker holds a core
# another process needs and a 2-thread op can take 5x longer. Passive waiting is the fair
# baseline here (the ONNX Runtime sessions of the comparisons get allow_spinning=0 likewise).
_OMP_WAIT = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from mssan_infer import GalleryOptions, Layout, OnnxRuntimeOptions  # noqa: E402

log = logging.getLogger("bench")

PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "d": 1024,
        "word_dim": 300,
        "dv": 2048,
        "regions": 36,
        "words": 12,
        "scorer_k": 100,
        "shard": 128,
        "scorer_repeats": 30,
        "loop_max_pairs": 128 * 128,
        "t2i_sizes": [1000, 5000, 25000],
        "i2t_sizes": [1000, 5000],
        "mmap_sizes": [100000],
        "ivf_sizes": [25000, 100000],
        "i2t_mmap_sizes": [20000],
        "layout_sizes": [5000, 25000, 100000],
        "i2t_layout_sizes": [1000, 5000, 20000],
        "exhaustive_max": 100000,
        "depths": [0, 10, 50, 100, 200],
        "repeats_fast": 40,
        "repeats_slow": 7,
        "max_seconds": 90.0,
        "pool": 500,
        "queries": 50,
        "train_images": 1500,
        "epochs": 3,
        "train_max_steps": None,
        "train_model_overrides": {},
        "recall_images": 5000,
        "recall_queries": 500,
        "encode_batch": 64,
        "encode_repeats": 10,
        "ref_small": 5000,
        "ref_large": 25000,
        "ref_mmap": 100000,
        "qdrant_sizes": [25000, 100000],
        "qdrant_i2t_sizes": [25000, 100000],
        "qdrant_server_size": 5000,
        "qdrant_repeats": 15,
        "text_model": None,
        "text_sizes": [5000, 25000],
        "text_repeats": 30,
        "text_layers": [2, 3],
        "latency_text_layers": 2,
        "own_processes": 5,
        "own_queries": 200,
    },
    "quick": {
        "d": 1024,
        "word_dim": 300,
        "dv": 2048,
        "regions": 36,
        "words": 12,
        "scorer_k": 100,
        "shard": 64,
        "scorer_repeats": 10,
        "loop_max_pairs": 64 * 64,
        "t2i_sizes": [1000, 5000],
        "i2t_sizes": [1000],
        "mmap_sizes": [],
        "ivf_sizes": [5000],
        "i2t_mmap_sizes": [],
        "layout_sizes": [1000, 5000],
        "i2t_layout_sizes": [1000],
        "exhaustive_max": 5000,
        "depths": [0, 10, 50, 100, 200],
        "repeats_fast": 15,
        "repeats_slow": 3,
        "max_seconds": 20.0,
        "pool": 200,
        "queries": 20,
        "train_images": 500,
        "epochs": 1,
        "train_max_steps": None,
        "train_model_overrides": {},
        "recall_images": 1000,
        "recall_queries": 200,
        "encode_batch": 32,
        "encode_repeats": 4,
        "ref_small": 1000,
        "ref_large": 5000,
        "ref_mmap": 100000,
        "qdrant_sizes": [2000],
        "qdrant_i2t_sizes": [400],
        "qdrant_server_size": 500,
        "qdrant_repeats": 5,
        "text_model": None,
        "text_sizes": [1000, 5000],
        "text_repeats": 8,
        "text_layers": [2, 3],
        "latency_text_layers": 2,
        "own_processes": 1,
        "own_queries": 60,
    },
}
SECTIONS = ("scorer", "latency", "recall", "encode", "text", "qdrant")
# Runtime settings timed beside the default at rerank 100 (section 2).
VARIANTS: dict[str, dict[str, Any]] = {
    "spin": {"allow_spinning": True},
    "nospin": {"session_config": {"session.intra_op.allow_spinning": "0"}},
    "txt1": {"graph_threads": {"text_encoder": 1}},
    "gather2": {"gather_threads": 2},
    "blas1": {"numpy_threads": 1},
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch folder (bundles, galleries); default /tmp/mssan-bench",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", type=Path, default=None, help="trained checkpoint for the recall section")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--keep-openblas-env", action="store_true", help="keep OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a preset value, e.g. --set t2i_sizes=[1000] --set d=64 (repeatable)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    mode = "quick" if args.quick else "full"
    cfg: dict[str, Any] = dict(PRESETS[mode])
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in cfg:
            raise SystemExit(f"--set: unknown key {k!r}; known: {sorted(cfg)}")
        try:
            cfg[k] = json.loads(v)
        except ValueError:
            raise SystemExit(
                f"--set {k}: {v!r} is not JSON; quote strings, e.g. --set '{k}=\"{v}\"'"
            ) from None
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(sections) - set(SECTIONS)
    if bad:
        raise SystemExit(f"--sections: unknown {sorted(bad)}; choose from {SECTIONS}")
    cfg.update(
        {
            "mode": mode,
            "threads": args.threads,
            "sections": sections,
            "scorer_k_shape": f"t2i_1x{cfg['scorer_k']}",
            "scorer_shard_shape": f"shard_{cfg['shard']}x{cfg['shard']}",
            "openblas_env_removed": sorted(_REMOVED_ENV),
            "omp_wait_policy": _OMP_WAIT,
        }
    )
    work = args.work or Path("/tmp/mssan-bench")
    work.mkdir(parents=True, exist_ok=True)

    import numpy as np
    import torch

    from .timing import cpu_pressure, loadavg, machine_info, versions

    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        cfg["numpy_threads"] = f"threadpoolctl {args.threads}"
    except ImportError:
        cfg["numpy_threads"] = "OpenBLAS default (threadpoolctl not installed)"
    notes = [
        "Candidates of one comparison run interleaved (rotating order) on the same inputs after warm-up.",
        "ONNX Runtime sessions of the scorer comparison run with allow_spinning=0 so idle workers do not "
        "steal the cores from the interleaved PyTorch rounds; PyTorch runs with OMP_WAIT_POLICY="
        f"{_OMP_WAIT} for the same reason (numpy BLAS on 1 thread except in the sgemm rounds of section 1).",
        "Gallery size N: t2i searches N images; i2t searches the 5N captions of N images.",
        "Latency galleries are tiled from items encoded by the bundle's encoders "
        "(values do not change speed).",
        "Exhaustive PyTorch = encode the query in PyTorch + MSSAN.score over every gallery item "
        "(shards of 1024) + top-k.",
    ]
    if _REMOVED_ENV:
        notes.append(f"Removed from the bench process environment: {sorted(_REMOVED_ENV)}.")
    cfg["notes"] = notes
    res: dict[str, Any] = {"machine": machine_info(), "versions": versions()}
    t_start = time.perf_counter()

    from mssan_infer import Retriever
    from training.checkpoint import load_checkpoint

    from .fixtures import random_captions, random_regions, speed_bundle, speed_checkpoint, trained_bundle

    speed = None
    if {"scorer", "encode", "text", "qdrant"} & set(sections):
        speed = speed_bundle(work, cfg["d"], cfg["word_dim"], cfg["dv"])
        model = load_checkpoint(speed_checkpoint(work, cfg["d"], cfg["word_dim"], cfg["dv"])).model.eval()
        rt = Retriever.load(speed, OnnxRuntimeOptions(threads=args.threads), verify=False)
        n_pool = max(cfg["pool"], cfg["shard"], cfg["scorer_k"])
        pool_imgs = rt.encode_images(random_regions(n_pool, cfg["regions"], cfg["dv"]))
        pool_txts = rt.encode_texts(random_captions(n_pool, cfg["words"]))

    if "scorer" in sections:
        from .scorer import run_scorer

        k, s = cfg["scorer_k"], cfg["shard"]
        # t2i rerank: one caption x K images; i2t rerank: one image x K captions; evaluation shard.
        shapes = [(f"t2i_1x{k}", k, 1), (f"i2t_1x{k}", 1, k), (f"shard_{s}x{s}", s, s)]
        res["scorer"] = run_scorer(
            speed,
            model,
            pool_imgs,
            pool_txts,
            shapes,
            args.threads,
            cfg["scorer_repeats"],
            cfg["loop_max_pairs"],
            cfg["max_seconds"],
        )
    if "latency" in sections:
        from .retrieval import run_latency
        from .text_tower import default_text_model, minilm_speed_bundle, minilm_speed_checkpoint

        # the default tower: a paper-size random MSSAN with the MiniLM text tower cut to
        # latency_text_layers layers; its int8 text encoder is the fast path's (with the int8 layout)
        lat_folder = Path(cfg["text_model"]) if cfg["text_model"] else default_text_model()
        lat_name = "all-MiniLM-L6-v2" if not cfg["text_model"] else lat_folder.name
        lat_layers = cfg["latency_text_layers"]
        lat_bundle, lat_int8 = minilm_speed_bundle(work, lat_folder, cfg["d"], cfg["dv"], lat_layers)
        lat_model = load_checkpoint(
            minilm_speed_checkpoint(work, lat_folder, cfg["d"], cfg["dv"], lat_layers)
        ).model.eval()
        lat_rt = Retriever.load(lat_bundle, OnnxRuntimeOptions(threads=args.threads), verify=False)
        res["latency_tower"] = {
            "text_model": lat_name,
            "text_model_folder": str(lat_folder),
            "text_layers": lat_layers,
            "bundle": str(lat_bundle),
            "int8_text_encoder": str(lat_int8),
        }
        notes.append(
            "Latency (section 2): the default tower, a random paper-size MSSAN with "
            f"{lat_name}'s first {lat_layers} layers as its text tower; exact default = fp32 graphs "
            "and the fp32 layout, fast path = its int8 text encoder and the int8 layout."
        )
        n_lat_pool = max(cfg["pool"], cfg["scorer_k"])
        lat_pools = {
            "images": lat_rt.encode_images(random_regions(n_lat_pool, cfg["regions"], cfg["dv"])),
            "texts": lat_rt.encode_texts(random_captions(n_lat_pool, cfg["words"])),
        }
        bundle_id = lat_rt.bundle_id
        sizes = [
            {"n": n, "direction": "t2i", "exhaustive": n <= cfg["exhaustive_max"]} for n in cfg["t2i_sizes"]
        ]
        sizes += [
            {"n": n, "direction": "i2t", "exhaustive": n <= cfg["exhaustive_max"]} for n in cfg["i2t_sizes"]
        ]
        # memory-mapped galleries are written as float32, so every layout (fp32 included) can be
        # opened from them
        sizes += [
            {"n": n, "direction": "t2i", "mmap": True, "exhaustive": n <= cfg["exhaustive_max"]}
            for n in cfg["mmap_sizes"]
        ]
        sizes += [
            {"n": n, "direction": "i2t", "mmap": True, "exhaustive": 5 * n <= cfg["exhaustive_max"]}
            for n in cfg["i2t_mmap_sizes"]
        ]
        for sz in sizes:
            sz["bundle_id"] = bundle_id
            sz["ivf"] = sz["direction"] == "t2i" and sz["n"] in cfg["ivf_sizes"]
            sz["layouts"] = sz["n"] in cfg["layout_sizes" if sz["direction"] == "t2i" else "i2t_layout_sizes"]
            if sz["direction"] == "i2t":
                sz["n_items"] = 5 * sz["n"]
        pools = lat_pools

        def factory(index: Path, mmap: bool, local_dtype: str) -> Any:
            return Retriever.load(
                lat_bundle,
                OnnxRuntimeOptions(threads=args.threads),
                index=index,
                verify=False,
                gallery=GalleryOptions(
                    layout=(Layout("float32", local_dtype) if local_dtype else None), mmap=mmap
                ),
            )

        queries = {
            "texts": random_captions(cfg["queries"], cfg["words"], seed=7),
            "images": random_regions(cfg["queries"], cfg["regions"], cfg["dv"], seed=7),
        }
        free = _free_gb(work)
        from mssan_infer.names import INDEX_MANIFEST

        from .layouts import bandwidth_gbs, layout_folder, resident_mb
        from .retrieval import gallery_folder

        def to_write(sz: dict[str, Any]) -> int:
            """Bytes per local value still to write for ``sz``: the float32 gallery (4), and for a
            memory-mapped one opened in every layout an int8 copy saved beside it plus the int8 spill file
            of the conversion while it is saved (2); 0 for what a run before left in ``work``."""
            gname = "images" if sz["direction"] == "t2i" else "texts"
            folder = gallery_folder(work, gname, sz.get("n_items", sz["n"]), bundle_id)
            done = (folder / INDEX_MANIFEST).is_file()
            copy = sz.get("mmap") and sz["layouts"]
            copy_done = (layout_folder(folder, "int8") / INDEX_MANIFEST).is_file()
            return (0 if done else 4) + (2 if copy and not copy_done else 0)

        need = (
            sum(
                sz.get("n_items", sz["n"])
                * (cfg["regions"] if sz["direction"] == "t2i" else cfg["words"])
                * cfg["d"]
                * to_write(sz)
                for sz in sizes
            )
            / 2**30
        )
        log.info("latency: galleries to write need about %.1f GB on %s (%.1f GB free)", need, work, free)
        if need > free * 0.8:
            raise SystemExit(
                f"not enough disk in {work}: galleries need ~{need:.1f} GB, {free:.1f} GB free; "
                "pass --work elsewhere or smaller --set sizes"
            )
        res["bandwidth_gbs"] = bandwidth_gbs(args.threads)
        log.info("latency: memory read bandwidth %.1f GB/s (%d threads)", res["bandwidth_gbs"], args.threads)
        res["resident_bundle_only"] = resident_mb(lat_bundle, None, "fp32", False, True, queries["texts"])
        res["latency"] = run_latency(
            factory,
            lat_model,
            lat_rt.tokenizer,
            pools,
            sizes,
            cfg["depths"],
            work,
            args.threads,
            queries,
            cfg["repeats_fast"],
            cfg["repeats_slow"],
            cfg["max_seconds"],
            variant_options=VARIANTS,
            bundle=lat_bundle,
            bandwidth=res["bandwidth_gbs"],
            int8_text_encoder=lat_int8,
            own_processes=cfg["own_processes"],
            own_queries=cfg["own_queries"],
        )
        lat_rt.close()
        del lat_model, lat_pools, pools
    if "qdrant" in sections:
        from .qdrant import run_qdrant_latency
        from .qdrant_server import run_qdrant_server

        q_texts = random_captions(cfg["queries"], cfg["words"], seed=7)
        res["qdrant"] = run_qdrant_latency(
            speed,
            {"images": pool_imgs, "texts": pool_txts},
            cfg["qdrant_sizes"],
            {"texts": q_texts, "images": random_regions(cfg["queries"], cfg["regions"], cfg["dv"], seed=7)},
            work,
            args.threads,
            cfg["qdrant_repeats"],
            cfg["max_seconds"],
            i2t_sizes=cfg["qdrant_i2t_sizes"],
        )
        if cfg["qdrant_server_size"]:
            res["qdrant_server"] = run_qdrant_server(
                speed,
                pool_imgs,
                cfg["qdrant_server_size"],
                q_texts,
                work,
                args.threads,
                cfg["qdrant_repeats"],
                cfg["max_seconds"],
            )
    if "encode" in sections:
        from .encode import run_encode

        res["encode"] = run_encode(
            rt,
            cfg["regions"],
            cfg["dv"],
            cfg["words"],
            cfg["encode_batch"],
            cfg["encode_repeats"],
            cfg["max_seconds"],
        )
    if "text" in sections:
        from .text_tower import default_text_model, run_text_tower

        # text_model: a local Hugging Face folder (default: the MiniLM of the dev extra)
        folder = Path(cfg["text_model"]) if cfg["text_model"] else default_text_model()
        res["text"] = run_text_tower(
            work,
            speed,
            folder,
            args.threads,
            cfg["d"],
            cfg["dv"],
            cfg["regions"],
            cfg["words"],
            cfg["encode_batch"],
            cfg["text_sizes"],
            cfg["text_repeats"],
            cfg["max_seconds"],
            queries=cfg["queries"],
            layers=cfg["text_layers"],
        )
    if speed is not None:
        rt.close()
    if "recall" in sections:
        from .recall import run_recall

        ckpt, tb, info = trained_bundle(
            work,
            cfg["train_images"],
            cfg["epochs"],
            checkpoint=args.checkpoint,
            max_steps=cfg["train_max_steps"],
            model_overrides=cfg["train_model_overrides"],
        )
        res["train"] = info
        with Retriever.load(tb, OnnxRuntimeOptions(threads=args.threads), verify=False) as r:
            res["recall"] = run_recall(
                r,
                cfg["recall_images"],
                cfg["depths"],
                cfg["recall_queries"],
                ivf=True,
                layouts=("int8-stage1", "int8"),
            )
            if "qdrant" in sections:
                from .qdrant import run_qdrant_recall

                res["qdrant_recall"] = run_qdrant_recall(r, work, cfg["recall_queries"])
    res["machine"]["loadavg_end"] = loadavg()
    res["machine"]["cpu_pressure_end"] = cpu_pressure()
    res["elapsed_s"] = time.perf_counter() - t_start
    from .report import write_results

    summary = write_results(res, cfg, args.out, with_plots=not args.no_plots)
    print((args.out / "results.md").read_text(encoding="utf-8"))
    log.info("wrote %s in %.0f s", args.out, res["elapsed_s"])
    del np
    return 0 if summary else 1


def _free_gb(path: Path) -> float:
    import shutil

    return shutil.disk_usage(path).free / 2**30


if __name__ == "__main__":
    sys.exit(main())
