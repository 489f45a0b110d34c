"""The int8 text encoder (``python -m export ... --int8``): CPU fusions, dynamic int8 weights, its own gate.

1. ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``, model type
   ``bert``) fuses what it recognises in the fp32 ``text_encoder.onnx`` for the CPU provider
   (SkipLayerNormalization, BiasGelu, ...; the fused counts are recorded). A Bi-GRU graph
   has nothing to fuse and skips this step.
2. ``onnxruntime.quantization.quantize_dynamic`` quantizes every ``MatMul``/``Gemm`` whose
   second input is a weight to int8, one scale per output channel, in 7 bits (``reduce_range``:
   x86 CPUs without VNNI run U8S8 through ``vpmaddubsw``, whose int16 pair sums saturate on full
   8-bit weights) (``MatMulInteger``, activations quantized per call as uint8). Products of two activations
   (attention scores, the Gram
   matrix) stay fp32, and so do softmax, norms and reductions; I/O is unchanged.

The result is ``int8/text_encoder.onnx``; the bundle's ``int8_graphs`` pairs it with the
fp32 image encoder and scorer, so ``Retriever.load(..., precision="int8")`` runs it.

Gate (fatal like the other parity checks; DESIGN §10 "int8 text encoder"):

- the usual per-output comparison with PyTorch on the parity cases and the random-input
  rerank, at ``TOLERANCES["int8"]`` -- a loose bound that catches a broken graph;
- on the synthetic test split (or ``data``'s test split): images encoded by PyTorch, captions
  by PyTorch (reference) and by the int8 graph, final scores through the model's ``score``;
  a rerank of ``rerank_depth`` stage-1 candidates per query must keep >= ``INT8_TOP10`` of the
  reference top 10 on average, and exhaustive R@1 of int8 over R@1 of the reference must be
  >= ``INT8_RECALL_RATIO`` in both directions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import torch

from mssan_infer.spec import IMAGE_ENCODER, SCORER, TEXT_ENCODER
from training.model import MSSAN, Encoded

from .errors import ExportError
from .manifest import INT8_DIR
from .onnx import check_onnx
from .runners import onnx_runner
from .validate import ParityReport, validate_graphs

__all__ = [
    "INT8_TOP10",
    "INT8_RECALL_RATIO",
    "Int8Report",
    "quantize_text_encoder",
    "check_split",
    "export_int8",
]

log = logging.getLogger(__name__)

INT8_TOP10 = 0.9  # mean share of the reference top 10 kept by a rerank with int8 captions
INT8_RECALL_RATIO = 0.99  # R@1(int8) / R@1(fp32 PyTorch), exhaustive, each direction
SPLIT_IMAGES = 200  # images of the synthetic test split when no data is given
QUANTIZED_OPS = ("MatMul", "Gemm")


@dataclass
class Int8Report(ParityReport):
    """The parity report of the int8 graphs plus the split check (top-10 agreement and recall ratio)."""

    split: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        return super().failures + [f"[int8] {m}" for m in self.split.get("failures", [])]

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["split_check"] = self.split
        d["quantization"] = self.quantization
        return d


@contextlib.contextmanager
def _quiet_root_logger() -> Any:
    """ONNX Runtime's optimizer and quantizer log every skipped node on the root logger; keep errors only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def quantize_text_encoder(src: Path, dst: Path, hf_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Fuse (transformer towers) and dynamically quantize ``src`` into ``dst``; returns the record.

    Raises:
        ExportError: the optimizer or the quantizer failed, or nothing was quantized.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    record: dict[str, Any] = {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "int8",
        "activations": "uint8, quantized per call",
        "op_types": list(QUANTIZED_OPS),
        "per_channel": True,
        "reduce_range": True,
        "matmul_const_b_only": True,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mssan-int8-") as tmp, _quiet_root_logger():
        fused = Path(tmp) / "fused.onnx"
        if hf_config:
            from onnxruntime.transformers.optimizer import optimize_model

            try:
                opt = optimize_model(
                    str(src),
                    model_type="bert",
                    num_heads=int(hf_config["num_attention_heads"]),
                    hidden_size=int(hf_config["hidden_size"]),
                    opt_level=0,
                    use_gpu=False,
                )
            except Exception as e:  # the optimizer raises many types
                raise ExportError(f"ONNX Runtime's transformer optimizer failed on {src.name}: {e}") from e
            record["fusions"] = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
            opt.save_model_to_file(str(fused))
        else:
            record["fusions"] = {}
            onnx.save(onnx.load(str(src)), str(fused))
        try:
            # per output channel: per-tensor scales failed the gate on MiniLM (top-10 0.86, t2i R@1
            # ratio 0.971 after one epoch); per channel passed it (0.93, 0.998). 7-bit weights
            # (reduce_range, ONNX Runtime's advice for CPUs without VNNI): on the 8-epoch MiniLM default
            # model full 8-bit weights failed the R@1 gate on an AVX2 EPYC (t2i 0.983, i2t 0.987), 7-bit
            # passed (1.000, 0.993) at the same speed (docs/design.md §10)
            quantize_dynamic(
                str(fused),
                str(dst),
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                reduce_range=True,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        except Exception as e:  # the quantizer raises many types
            raise ExportError(f"dynamic int8 quantization of {src.name} failed: {e}") from e
    ops = _op_counts(onnx.load(str(dst)))
    record["quantized_nodes"] = ops.get("MatMulInteger", 0) + ops.get("QAttention", 0) + ops.get("QGemm", 0)
    record["fp32_matmuls_left"] = ops.get("MatMul", 0)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    if record["quantized_nodes"] == 0:
        raise ExportError(f"int8: no MatMul/Gemm with a weight was quantized in {src.name}")
    check_onnx(dst)
    log.info(
        "int8 text encoder: fusions %s, %d quantized MatMul(s), %d fp32 MatMul(s) left, %.1f MiB",
        record["fusions"],
        record["quantized_nodes"],
        record["fp32_matmuls_left"],
        dst.stat().st_size / 2**20,
    )
    return record


def _split(
    model: MSSAN, data: str | os.PathLike[str] | None
) -> tuple[np.ndarray, np.ndarray | None, list[str], str]:
    """Images, region mask, captions and a description of the split the gate runs on."""
    if data is not None:
        from training.data import load_split

        split = load_split(data, "test")
        return np.asarray(split.images), split.region_mask, list(split.captions), f"{data} test split"
    from training.synth import SYNTH_KNOBS, generate_split

    feat_dim = int(SYNTH_KNOBS["feat_dim"][0])
    if model.cfg.img_dim != feat_dim:
        raise ExportError(
            f"--int8 checks recall on the synthetic test split ({feat_dim}-d regions), but this model takes "
            f"{model.cfg.img_dim}-d regions; pass --int8-data DIR (a precomp folder with a test split of "
            "its data)"
        )
    ims, caps = generate_split(SPLIT_IMAGES, seed=0, split="test")
    return ims, None, caps, f"synthetic test split (seed 0, {SPLIT_IMAGES} images)"


@torch.inference_mode()
def check_split(
    model: MSSAN,
    tokenizer: Any,
    int8_text: Path,
    data: str | os.PathLike[str] | None = None,
    depth: int = 100,
    batch: int = 64,
) -> dict[str, Any]:
    """Top-10 agreement of a rerank and the exhaustive R@1 ratio, int8 captions vs PyTorch fp32.

    ``tokenizer``: the checkpoint's (word or subword). Returns the record; ``failures`` lists what
    is below ``INT8_TOP10`` / ``INT8_RECALL_RATIO``.
    """
    from training.evaluate import (
        encode_split,
        pad_cat,
        ranks_i2t,
        ranks_t2i,
        recall_from_ranks,
        sharded_score,
    )

    ims, mask, caps, where = _split(model, data)
    tok = tokenizer
    img, ref = encode_split(model, ims, mask, caps, tok)
    runner = onnx_runner({TEXT_ENCODER.name: int8_text}, "int8")
    parts = []
    for s in range(0, len(caps), batch):
        tokens, tmask = tok.encode_batch(caps[s : s + batch])
        res = runner.run(TEXT_ENCODER.name, {"tokens": tokens, "token_mask": tmask})
        st1, loc, gram = (res[n] for n in TEXT_ENCODER.output_names)
        d = model.cfg.embed_size
        t = [torch.from_numpy(x) for x in (st1, loc, tmask, gram)]
        parts.append(Encoded(t[0], t[1], t[2], t[3], t[0][:, :d], t[0][:, d:]))
    q = pad_cat(parts)
    full_ref = sharded_score(model, img, ref)
    full_q = sharded_score(model, img, q)
    out: dict[str, Any] = {
        "data": where,
        "images": int(img.stage1.shape[0]),
        "captions": len(caps),
        "depth": depth,
        "failures": [],
    }
    rec_ref = {"i2t": recall_from_ranks(ranks_i2t(full_ref)), "t2i": recall_from_ranks(ranks_t2i(full_ref))}
    rec_q = {"i2t": recall_from_ranks(ranks_i2t(full_q)), "t2i": recall_from_ranks(ranks_t2i(full_q))}
    out["recall_fp32"], out["recall_int8"] = rec_ref, rec_q
    ratios = {}
    for direction in ("i2t", "t2i"):
        a, b = rec_q[direction]["r1"], rec_ref[direction]["r1"]
        ratios[direction] = a / b if b > 0 else (1.0 if a == 0 else float("inf"))
    out["recall1_ratio"] = ratios
    # rerank: each query's top `depth` candidates by the reference stage 1, re-ordered by the final scores
    stage1 = (img.stage1 @ ref.stage1.t()).numpy()  # [Ni,Nt]
    agree = {}
    for direction, s1, fr, fq in (("t2i", stage1.T, full_ref.T, full_q.T), ("i2t", stage1, full_ref, full_q)):
        k = min(depth, s1.shape[1])
        cand = np.argpartition(-s1, k - 1, axis=1)[:, :k]  # [Q,k]
        top_r = np.take_along_axis(
            cand, np.argsort(-np.take_along_axis(fr, cand, 1), 1, kind="stable")[:, :10], 1
        )
        top_q = np.take_along_axis(
            cand, np.argsort(-np.take_along_axis(fq, cand, 1), 1, kind="stable")[:, :10], 1
        )
        shared = [len(set(a) & set(b)) / top_r.shape[1] for a, b in zip(top_r.tolist(), top_q.tolist())]
        agree[direction] = {"mean": float(np.mean(shared)), "min": float(np.min(shared))}
    out["top10_agreement"] = agree
    out["max_abs_score"] = float(np.abs(full_q.astype(np.float64) - full_ref).max())
    for direction in ("t2i", "i2t"):
        if agree[direction]["mean"] < INT8_TOP10:
            out["failures"].append(
                f"split rerank {direction}@{depth}: mean top-10 agreement "
                f"{agree[direction]['mean']:.3f} < {INT8_TOP10}"
            )
        if not ratios[direction] >= INT8_RECALL_RATIO:
            out["failures"].append(
                f"split {direction} R@1 ratio int8/fp32 {ratios[direction]:.3f} < {INT8_RECALL_RATIO} "
                f"({rec_q[direction]['r1']:.1f} vs {rec_ref[direction]['r1']:.1f})"
            )
    log_fn = log.error if out["failures"] else log.info
    log_fn(
        "int8 on the %s: top-10 agreement t2i %.3f i2t %.3f; R@1 ratio t2i %.3f i2t %.3f; max |score diff| "
        "%.3g",
        where,
        agree["t2i"]["mean"],
        agree["i2t"]["mean"],
        ratios["t2i"],
        ratios["i2t"],
        out["max_abs_score"],
    )
    return out


def export_int8(
    model: MSSAN,
    tokenizer: Any,
    fp32_paths: Mapping[str, Path],
    root: Path,
    *,
    data: str | os.PathLike[str] | None = None,
) -> tuple[Int8Report, dict[str, Any]]:
    """Write ``root/int8/text_encoder.onnx`` and check it; returns the report and the manifest's
    ``int8_graphs``."""
    (root / INT8_DIR).mkdir(exist_ok=True)
    dst = root / INT8_DIR / TEXT_ENCODER.file
    record = quantize_text_encoder(
        Path(fp32_paths[TEXT_ENCODER.name]),
        dst,
        model.cfg.text_config if model.cfg.text_encoder == "transformer" else None,
    )
    paths = {
        IMAGE_ENCODER.name: fp32_paths[IMAGE_ENCODER.name],
        TEXT_ENCODER.name: dst,
        SCORER.name: fp32_paths[SCORER.name],
    }
    base = validate_graphs(model, paths, precision="int8")
    report = Int8Report(
        **{
            k: getattr(base, k)
            for k in (
                "precision",
                "tolerance",
                "execution",
                "reference",
                "label",
                "contract",
                "outputs",
                "reranks",
            )
        }
    )
    report.execution = (
        "onnxruntime CPUExecutionProvider (default optimizations); int8 text encoder, fp32 others"
    )
    report.quantization = record
    report.split = check_split(model, tokenizer, dst, data)
    table = {
        TEXT_ENCODER.name: {
            **TEXT_ENCODER.to_dict(),
            "file": f"{INT8_DIR}/{TEXT_ENCODER.file}",
            "precision": "int8",
            "note": "MatMul/Gemm weights int8 (dynamic quantization, CPU); products of two "
            "activations, softmax, norms and reductions fp32; float32 I/O",
        },
        IMAGE_ENCODER.name: {**IMAGE_ENCODER.to_dict(), "precision": "fp32"},
        SCORER.name: {**SCORER.to_dict(), "precision": "fp32"},
    }
    return report, {"int8_graphs": table}
