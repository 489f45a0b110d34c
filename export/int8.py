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
- on a dev split of the user's data (``gate_data``: ``--int8-data DIR``, else the training data
  the checkpoint records, regenerated when it was the synthetic set and is gone; at most
  ``GATE_MAX_IMAGES`` images): images encoded by PyTorch, captions by PyTorch (reference) and by
  the int8 graph, final scores through the model's ``score``; a rerank of ``rerank_depth``
  stage-1 candidates per query must keep >= ``INT8_TOP10`` of the reference top 10 on average,
  and exhaustive R@1 of int8 over R@1 of the reference must be >= ``INT8_RECALL_RATIO`` in both
  directions;
- the ratio is judged only when the reference finds enough correct first hits to mean something
  (``judge_floor``): below that the model is too weak to judge, which is neither a pass nor a
  failure: the report does not pass (its ``reasons`` say why), so ``export.validate.raise_if_failed``
  refuses the export then (``verify=False`` records it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

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
    "MIN_R1_HITS",
    "CHANCE_MULTIPLE",
    "GATE_MAX_IMAGES",
    "TOO_WEAK",
    "NO_INT8",
    "default_int8",
    "GateData",
    "Int8Report",
    "gate_data",
    "judge_floor",
    "judge",
    "quantize_text_encoder",
    "check_split",
    "export_int8",
]

log = logging.getLogger(__name__)

INT8_TOP10 = 0.9  # mean share of the reference top 10 kept by a rerank with int8 captions
INT8_RECALL_RATIO = 0.99  # R@1(int8) / R@1(fp32 PyTorch), exhaustive, each direction
QUANTIZED_OPS = ("MatMul", "Gemm")
GATE_MAX_IMAGES = 1000  # the gate scores every image x caption pair twice: the first 1000 images at most
# The R@1 ratio is judged only when the fp32 model's correct first hits in a direction reach
# max(MIN_R1_HITS, CHANCE_MULTIPLE x the hits a random ranking expects) (``judge_floor``). Near chance
# the few hits are coincidences that int8's small score changes reshuffle, and a ratio of a handful
# of hits swings by tens of percent per query (the "0.667 (0.2 vs 0.3)" was 2 hits against
# 3 of 1000 queries), so it measures luck, not int8. At the usual 200-image dev split the floor is 10
# of 200 image queries (5%) and 25 of 1000 caption queries (2.5%); a model trained for a few epochs
# clears it by far (the tiny preset's one-epoch R@1 is above 20 both ways).
MIN_R1_HITS = 10
CHANCE_MULTIPLE = 5.0
TOO_WEAK = "too weak to judge"
NO_INT8 = "or --no-int8 to export without the int8 text encoder"


def default_int8(checkpoint: str | os.PathLike[str]) -> bool:
    """Whether ``python -m export`` writes the int8 text encoder of ``checkpoint`` when neither ``--int8``
    nor ``--no-int8`` is given: yes for a transformer text tower (the default of new models: its int8
    graph is the fast path's query encoder), no for the Bi-GRU (DESIGN §10 "int8 text encoder").

    Reads only the checkpoint's ``config.json``; one that cannot be read gives ``False`` (the export then
    reports the broken checkpoint itself).
    """
    try:
        cfg = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
        return bool(cfg["model"].get("text_encoder") == "transformer")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@dataclass
class Int8Report(ParityReport):
    """The parity report of the int8 graphs plus the split check (top-10 agreement and recall ratio)."""

    split: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        return super().failures + [f"[int8] {m}" for m in self.split.get("failures", [])]

    @property
    def reasons(self) -> list[str]:
        """The failures, then, when the gate could not judge the R@1 ratio (a model too weak), what to do:
        such a report never passes (nor fails)."""
        out = self.failures
        if not self.split.get("judged", True):
            out.append(str(self.split.get("too_weak") or f"--int8: the model is {TOO_WEAK}"))
        return out

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


@dataclass
class GateData:
    """The split the int8 gate runs on, and where it came from (logged and written to the manifest).

    ``source``: ``"--int8-data"``, ``"the checkpoint's training data"`` or ``"the checkpoint's synthetic
    training data, regenerated"``.
    """

    images: np.ndarray
    region_mask: np.ndarray | None
    captions: list[str]
    where: str
    source: str


def _folder_split(folder: Path) -> str:
    """``dev`` when ``folder`` has a dev split, else ``test`` (``load_split`` then names what is missing)."""
    return "dev" if (folder / "dev_ims.npy").is_file() or not (folder / "test_ims.npy").is_file() else "test"


def _first(
    images: np.ndarray, mask: np.ndarray | None, captions: Sequence[str]
) -> tuple[Any, Any, list[str], str]:
    n = len(images)
    if n <= GATE_MAX_IMAGES:
        return images, mask, list(captions), f"{n} images"
    k = GATE_MAX_IMAGES
    per = len(captions) // n
    return (
        images[:k],
        None if mask is None else mask[:k],
        list(captions[: k * per]),
        f"the first {k} of {n} images",
    )


def _load_folder(folder: Path, source: str) -> GateData:
    from training.data import load_split

    name = _folder_split(folder)
    split = load_split(folder, name)
    ims, mask, caps, size = _first(np.asarray(split.images), split.region_mask, split.captions)
    return GateData(ims, mask, caps, f"{folder} {name} split ({size})", source)


def _differences(recorded: Mapping[str, Any], folder: Path, split: str, found: GateData) -> list[str]:
    """How the ``split`` split of ``folder`` (``found``, before the ``GATE_MAX_IMAGES`` cut) differs from
    what the checkpoint recorded of its training data there (``training.train.data_record``): the split's
    size, the feature size and, for the synthetic set, its seed and knobs. Sizes the record lacks are not
    compared."""
    out = []
    sizes = recorded.get("splits") or {}
    n = _split_size(folder, split)
    want = sizes.get(split) if isinstance(sizes, Mapping) else None
    if isinstance(want, int) and n is not None and n != want:
        out.append(f"its {split} split has {n} images, the record says {want}")
    dim = recorded.get("feat_dim")
    if isinstance(dim, int) and int(found.images.shape[-1]) != dim:
        out.append(f"its regions are {int(found.images.shape[-1])}-d, the record says {dim}-d")
    synth = recorded.get("synth")
    meta = _synth_meta(folder)
    if isinstance(synth, Mapping):
        if meta is None:
            out.append(f"the record says synthetic data (seed {synth.get('seed')}), the folder is not")
        else:
            for key in ("seed", "knobs"):
                if key in synth and meta.get(key) != synth.get(key):
                    have, want = meta.get(key), synth.get(key)
                    out.append(f"its synthetic {key} is {have!r}, the record says {want!r}")
    elif meta is not None:
        out.append(f"it is synthetic data (seed {meta.get('seed')}), the record says the data was not")
    return out


def _split_size(folder: Path, split: str) -> int | None:
    """Images in ``folder/{split}_ims.npy`` (its header only), or None when it cannot be read."""
    try:
        return int(np.load(folder / f"{split}_ims.npy", mmap_mode="r", allow_pickle=False).shape[0])
    except (OSError, ValueError, IndexError):
        return None


def _synth_meta(folder: Path) -> dict[str, Any] | None:
    """``meta.json`` of a synthetic set (``training.synth``) in ``folder``, else None."""
    import json

    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == "training.synth" else None


def gate_data(
    model: MSSAN,
    data: str | os.PathLike[str] | None,
    recorded: Mapping[str, Any] | None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> GateData:
    """The dev split the int8 gate runs on.

    1. ``data`` (``--int8-data DIR``): its ``dev`` split (``test`` if it has none);
    2. else the training data the checkpoint records (``state.json``'s ``data``, written by
       ``python -m training train``): the dev split of that folder (``test`` if it has none) when its
       size, feature size and synthetic seed are the recorded ones (else an error naming
       ``--int8-data``), or, when the folder is gone and it was the synthetic set, the same dev split
       regenerated from its seed and knobs;
    3. else an error: the gate never guesses the data.

    At most ``GATE_MAX_IMAGES`` images (the first ones) are used.

    Raises:
        ExportError: no data given or recorded, the recorded folder is gone (and was not synthetic) or
            holds other data than the record says, or the split's regions do not fit the model.
        InputError: the folder is not a precomp folder (``training.data.load_split``).
    """
    ck = f"checkpoint {checkpoint}" if checkpoint is not None else "the checkpoint"
    if data is not None:
        out = _load_folder(Path(data), "--int8-data")
    elif recorded and recorded.get("path"):
        folder = Path(str(recorded["path"]))
        synth = recorded.get("synth")
        if (folder / "dev_ims.npy").is_file() or (folder / "test_ims.npy").is_file():
            # as --int8-data: the dev split, else the test split; only when it is the recorded data
            out = _load_folder(folder, "the checkpoint's training data")
            differs = _differences(recorded, folder, _folder_split(folder), out)
            if differs:
                raise ExportError(
                    f"--int8 checks recall on the data the model was trained on, and {ck} was trained on "
                    f"{folder}, but that folder now holds other data ({'; '.join(differs)}). Pass "
                    "--int8-data DIR: a precomp folder with a dev split of the data the model was trained on "
                    f"({NO_INT8})"
                )
        elif isinstance(synth, Mapping):
            from training.synth import generate_split

            n = int((synth.get("splits") or {}).get("dev", 200))
            ims, caps = generate_split(
                n, seed=int(synth["seed"]), split="dev", **dict(synth.get("knobs") or {})
            )
            ims, _, caps, size = _first(ims, None, caps)
            out = GateData(
                ims,
                None,
                caps,
                f"synthetic dev split (seed {synth['seed']}, {size}), regenerated: {ck} was trained on "
                f"{folder}, which is not here",
                "the checkpoint's synthetic training data, regenerated",
            )
        else:
            raise ExportError(
                f"--int8 checks recall on the data the model was trained on, and {ck} was trained on "
                f"{folder}, which is not here (no dev_ims.npy nor test_ims.npy). Pass --int8-data DIR: a "
                f"precomp folder with a dev split of that data ({NO_INT8})"
            )
    else:
        raise ExportError(
            f"--int8 checks recall on the data the model was trained on, and {ck} does not record it "
            "(trained before checkpoints recorded their data, or not saved by `python -m training train`). "
            "Pass --int8-data DIR: a precomp folder with a dev split of the training data (the synthetic "
            "default: `python -m training synth --out DIR` with the seed and options you trained on; "
            f"{NO_INT8})"
        )
    dv = int(out.images.shape[-1])
    if dv != model.cfg.img_dim:
        raise ExportError(
            f"--int8: the gate's data ({out.where}) has {dv}-d regions, but this model takes "
            f"{model.cfg.img_dim}-d regions; pass --int8-data DIR with a dev split of the model's own data"
        )
    log.info("int8 gate data: %s (%s)", out.where, out.source)
    return out


def judge_floor(images: int, queries: int) -> int:
    """Fewest correct first hits (R@1 x queries) of the fp32 model for the R@1 ratio to be judged.

    ``images``: images in the split; ``queries``: queries of the direction (captions for text ->
    image, images for image -> text). A random ranking expects ``queries / images`` hits in either
    direction (each query has 1 of ``images`` right images, or 5 of ``5 x images`` right captions).
    """
    chance = queries / max(images, 1)
    return max(MIN_R1_HITS, math.ceil(CHANCE_MULTIPLE * chance))


@torch.inference_mode()
def check_split(
    model: MSSAN,
    tokenizer: Any,
    int8_text: Path,
    data: str | os.PathLike[str] | GateData,
    depth: int = 100,
    batch: int = 64,
) -> dict[str, Any]:
    """Top-10 agreement of a rerank and the exhaustive R@1 ratio, int8 captions vs PyTorch fp32.

    ``tokenizer``: the checkpoint's (word or subword); ``data``: a ``GateData`` (``gate_data``) or a
    precomp folder (its dev split). Returns the record: ``failures`` lists what is below
    ``INT8_TOP10`` / ``INT8_RECALL_RATIO``; ``verdict`` is ``"passed"``, ``"failed"`` or ``TOO_WEAK``
    (the fp32 R@1 of a direction is below ``judge_floor``: its ratio is neither a pass nor a failure,
    ``judged`` is false and ``too_weak`` says what to do).
    """
    from training.evaluate import (
        encode_split,
        pad_cat,
        ranks_i2t,
        ranks_t2i,
        recall_from_ranks,
        sharded_score,
    )

    gd = data if isinstance(data, GateData) else gate_data(model, data, None)
    ims, mask, caps, where = gd.images, gd.region_mask, gd.captions, gd.where
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
        "data_source": gd.source,
        "images": int(img.stage1.shape[0]),
        "captions": len(caps),
        "depth": depth,
    }
    rec_ref = {"i2t": recall_from_ranks(ranks_i2t(full_ref)), "t2i": recall_from_ranks(ranks_t2i(full_ref))}
    rec_q = {"i2t": recall_from_ranks(ranks_i2t(full_q)), "t2i": recall_from_ranks(ranks_t2i(full_q))}
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
    out["max_abs_score"] = float(np.abs(full_q.astype(np.float64) - full_ref).max())
    out.update(judge(rec_ref, rec_q, agree, int(img.stage1.shape[0]), len(caps), depth, where))
    return out


def judge(
    recall_fp32: Mapping[str, Mapping[str, float]],
    recall_int8: Mapping[str, Mapping[str, float]],
    agreement: Mapping[str, Mapping[str, float]],
    images: int,
    captions: int,
    depth: int,
    where: str,
) -> dict[str, Any]:
    """The gate's verdict from its measurements (recalls in %, ``{"i2t"|"t2i": {"r1": ..}}``; top-10
    agreement ``{"i2t"|"t2i": {"mean": ..}}``) on a split of ``images`` images and ``captions`` captions.

    Returns the record's verdict part: ``recall_fp32``, ``recall_int8``, ``recall1_ratio``,
    ``top10_agreement``, ``fp32_r1_hits``, ``judge_floor_hits``, ``queries``, ``judged``, ``failures``
    (agreement below ``INT8_TOP10`` in any case; a ratio below ``INT8_RECALL_RATIO`` where judged),
    ``verdict`` (``"passed"``, ``"failed"`` or ``TOO_WEAK``) and, for a weak model, ``too_weak`` (what
    to do). Logs the verdict.
    """
    ratios = {}
    for direction in ("i2t", "t2i"):
        a, b = recall_int8[direction]["r1"], recall_fp32[direction]["r1"]
        ratios[direction] = a / b if b > 0 else (1.0 if a == 0 else float("inf"))
    queries = {"i2t": images, "t2i": captions}
    hits = {d: round(recall_fp32[d]["r1"] * queries[d] / 100.0) for d in queries}
    floor = {d: judge_floor(images, queries[d]) for d in queries}
    weak = [d for d in ("i2t", "t2i") if hits[d] < floor[d]]
    out: dict[str, Any] = {
        "recall_fp32": {d: dict(v) for d, v in recall_fp32.items()},
        "recall_int8": {d: dict(v) for d, v in recall_int8.items()},
        "recall1_ratio": ratios,
        "top10_agreement": {d: dict(v) for d, v in agreement.items()},
        "fp32_r1_hits": hits,
        "judge_floor_hits": floor,
        "queries": queries,
        "judged": not weak,
        "failures": [],
    }
    for direction in ("t2i", "i2t"):
        if agreement[direction]["mean"] < INT8_TOP10:
            out["failures"].append(
                f"split rerank {direction}@{depth}: mean top-10 agreement "
                f"{agreement[direction]['mean']:.3f} < {INT8_TOP10}"
            )
        if direction not in weak and not ratios[direction] >= INT8_RECALL_RATIO:
            out["failures"].append(
                f"split {direction} R@1 ratio int8/fp32 {ratios[direction]:.3f} < {INT8_RECALL_RATIO} "
                f"({recall_int8[direction]['r1']:.1f} vs {recall_fp32[direction]['r1']:.1f})"
            )
    if weak:
        words = {"i2t": "image->text", "t2i": "text->image"}
        said = "; ".join(
            f"{words[d]} {recall_fp32[d]['r1']:.1f} ({hits[d]} of {queries[d]} queries right, the gate needs "
            f"{floor[d]})"
            for d in weak
        )
        out["too_weak"] = (
            f"--int8: the model is {TOO_WEAK} int8 against fp32 on the {where}: its fp32 R@1 is {said}, "
            "so the R@1 ratio (int8 / fp32) of such near-chance recalls would measure luck, not int8. Train "
            "longer (python -m training train ... --epochs N, or --resume) and export again, or export "
            "without it (--no-int8: a transformer tower's export writes it by default); "
            "--no-verify writes the int8 graph unverified (the manifest says verified: false)"
        )
        log.warning("%s", out["too_weak"])
    out["verdict"] = "failed" if out["failures"] else (TOO_WEAK if weak else "passed")
    log_fn = log.error if out["failures"] else log.info
    log_fn(
        "int8 on the %s: top-10 agreement t2i %.3f i2t %.3f; R@1 ratio t2i %.3f i2t %.3f%s",
        where,
        agreement["t2i"]["mean"],
        agreement["i2t"]["mean"],
        ratios["t2i"],
        ratios["i2t"],
        f" (not judged: {TOO_WEAK})" if weak else "",
    )
    return out


def export_int8(
    model: MSSAN,
    tokenizer: Any,
    fp32_paths: Mapping[str, Path],
    root: Path,
    *,
    data: GateData | str | os.PathLike[str] | None = None,
    recorded: Mapping[str, Any] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> tuple[Int8Report, dict[str, Any]]:
    """Write ``root/int8/text_encoder.onnx`` and check it; returns the report and the manifest's
    ``int8_graphs``.

    ``data``: the gate's split (a ``GateData``), or, with ``recorded``/``checkpoint``, where it comes
    from (``gate_data``: the ``--int8-data`` folder, else the checkpoint's recorded training data).
    """
    gd = data if isinstance(data, GateData) else gate_data(model, data, recorded, checkpoint)
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
    report.split = check_split(model, tokenizer, dst, gd)
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
