"""``export_bundle``: checkpoint folder -> verified bundle folder (DESIGN §5)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from mssan_infer.files import sha256_file
from mssan_infer.names import MANIFEST_FILE
from mssan_infer.spec import GRAPHS
from training.checkpoint import WEIGHTS, load_checkpoint

from .deployment_step import DeploymentStep
from .errors import ExportError
from .fp16 import convert_to_fp16
from .graphs import build_graphs
from .inputs import example_feeds
from .manifest import FP16_DIR, build_manifest, bundle_tokenizer_file, write_manifest
from .onnx import DEFAULT_OPSET, MIN_OPSET, check_onnx, export_graph
from .validate import ParityReport, raise_if_failed, validate_graphs

__all__ = ["export_bundle"]

log = logging.getLogger(__name__)


def _deployment_step(target: str, options: Any = None) -> DeploymentStep:
    """The builder of a deployment target; resolved before any work so a missing package fails fast.

    ``options``: ``export.tensorrt.TensorRTSettings`` / ``export.triton.TritonSettings`` (None: defaults).
    """
    if target == "tensorrt":
        from .tensorrt import make_step as tensorrt_step

        return tensorrt_step(options)
    if target == "triton":
        from .triton import make_step as triton_step

        return triton_step(options)
    raise ExportError(f"unknown deployment target {target!r}; choose 'tensorrt' or 'triton'")


def _check_out(out: Path, checkpoint: Path, force: bool) -> None:
    """Refuse an ``out`` that would destroy something: the checkpoint, or a non-bundle without ``force``."""
    ck, dst = checkpoint.resolve(), out.resolve()
    if dst == ck or dst in ck.parents:
        raise ExportError(f"--out {out} would replace the checkpoint {checkpoint}; choose another folder")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink():
        if (out / MANIFEST_FILE).is_file() or not any(out.iterdir()):
            return  # an earlier bundle or an empty folder: replaced
    if not force:
        raise ExportError(
            f"--out {out} exists and is not an export bundle (no {MANIFEST_FILE}); "
            "refusing to replace it. Choose a new folder or pass force=True / --force"
        )
    log.warning("--force: replacing %s", out)


def _place(tmp: Path, out: Path) -> None:
    """Move the finished bundle ``tmp`` to ``out``, replacing what ``_check_out`` allowed."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists() or old.is_symlink():
            os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists() or old.is_symlink():
        old.unlink()


def export_bundle(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    atol: float | None = None,
    verify: bool = True,
    tensorrt: Any = False,
    triton: Any = False,
    force: bool = False,
    pixels: bool = False,
    backbone: str | None = None,
    backbone_weights: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    resize: int | None = None,
    features: str | os.PathLike[str] | None = None,
    int8: bool = False,
    int8_data: str | os.PathLike[str] | None = None,
) -> Path:
    """Export a checkpoint folder to a bundle folder and check it against PyTorch.

    Writes ``image_encoder.onnx``, ``text_encoder.onnx``, ``scorer.onnx``, ``vocab.json`` (Bi-GRU)
    or ``tokenizer.json`` (transformer text tower),
    optionally ``fp16/*.onnx``, and ``manifest.json`` (sha256 of every file, parity report).
    The bundle is built in a temporary folder beside ``out`` and renamed into place, so
    ``out`` is either the old content or the complete new bundle.

    Args:
        checkpoint: a folder written by ``training.checkpoint.save_checkpoint``.
        out: the bundle folder. An existing bundle or empty folder is replaced; anything
            else only with ``force``.
        opset: ONNX opset of the exported graphs.
        fp16: also write fp16 variants (matrix products in fp16, the rest fp32) under ``fp16/``.
        atol: overrides the fp32 parity tolerance (``TOLERANCES["fp32"].atol``).
        verify: make parity failures fatal. With ``False`` parity is still measured and
            recorded, and the manifest says ``"verified": false``.
        tensorrt: also build TensorRT engines under ``tensorrt/`` (True, or an
            ``export.tensorrt.TensorRTSettings``); needs tensorrt and a GPU.
        triton: also write a Triton model repository ``triton/`` (True, or an
            ``export.triton.TritonSettings``). See docs/deployment.md.
        force: replace an ``out`` that is not a bundle.
        pixels: also write ``image_encoder_pixels.onnx`` (``backbone`` with ``backbone_weights``, then
            the image encoder) taking ``[B,3,H,W]`` pixels preprocessed as ``image_size``/``resize``
            say (recorded in the manifest); see ``export.pixels``. Defaults: resnet152 at 448, or
            what ``features`` (the ``features.json`` of the training features) records; the
            weights' sha256 is checked against it.
        int8: also write ``int8/text_encoder.onnx`` (ONNX Runtime's CPU fusions, then dynamic int8
            quantization of MatMul/Gemm weights; ``export.int8``), gated by top-10 agreement of a
            rerank and the R@1 ratio on the synthetic test split (or ``int8_data``'s test split).
        int8_data: a precomp folder whose ``test`` split the int8 gate runs on (needed when the
            model's regions are not the synthetic default's).
    Returns:
        The bundle folder.
    Raises:
        BundleError: the checkpoint folder is missing or damaged.
        ExportError: ``out`` must not be replaced, or an exporter/ONNX checker failure.
        BackendUnavailableError: ``tensorrt`` asked for without tensorrt/cuda-python/GPU.
        ParityError: (with ``verify``) the graphs disagree with PyTorch past tolerance.
    """
    if atol is not None and not (isinstance(atol, (int, float)) and atol > 0):
        raise ExportError(f"atol must be a positive number, got {atol!r}")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(
            f"opset must be an integer >= {MIN_OPSET}, got {opset!r}; the default is {DEFAULT_OPSET}"
        )
    steps = [
        _deployment_step(t, None if on is True else on)
        for t, on in (("tensorrt", tensorrt), ("triton", triton))
        if on
    ]
    ckpt, outp = Path(checkpoint), Path(out)
    _check_out(outp, ckpt, force)
    started = time.perf_counter()
    ck = load_checkpoint(ckpt)
    model, cfg = ck.model.eval(), ck.model.cfg
    pixel_backbone, pixel_prep = None, None
    if pixels:
        from .pixels import load_pixel_backbone, pixel_settings

        settings = pixel_settings(features, backbone, backbone_weights, image_size, resize)
        pixel_prep = settings.preprocessing
        pixel_backbone = load_pixel_backbone(model, settings.backbone, backbone_weights)
    log.info(
        "checkpoint %s: D=%d, text %s, Dv=%d, vocab %d",
        ckpt,
        cfg.embed_size,
        cfg.text_encoder,
        cfg.img_dim,
        cfg.vocab_size,
    )

    outp.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outp.name}.tmp-", dir=outp.parent))
    try:
        wrappers, examples = build_graphs(model), example_feeds(model)
        paths = {
            name: export_graph(wrappers[name], spec, examples[name], tmp / spec.file, opset=opset)
            for name, spec in GRAPHS.items()
        }
        reports: list[ParityReport] = [validate_graphs(model, paths, precision="fp32", atol=atol)]
        if fp16:
            (tmp / FP16_DIR).mkdir()
            paths16 = {}
            for name, spec in GRAPHS.items():
                p16 = tmp / FP16_DIR / spec.file
                onnx.save(convert_to_fp16(onnx.load(str(paths[name]))), str(p16))
                check_onnx(p16)
                paths16[name] = p16
            reports.append(validate_graphs(model, paths16, precision="fp16"))
        int8_extra: dict[str, Any] = {}
        if int8:
            from .int8 import export_int8

            int8_report, int8_extra = export_int8(model, ck.tokenizer, paths, tmp, data=int8_data)
            reports.append(int8_report)
        pixel_extra: dict[str, Any] = {}
        if pixel_backbone is not None and pixel_prep is not None:
            from .pixels import export_pixel_graph

            pixel_report, pixel_extra = export_pixel_graph(
                model,
                pixel_backbone,
                tmp,
                pixel_prep,
                opset=opset,
                atol=atol,
                backbone_weights=backbone_weights,
            )
            reports.append(pixel_report)
        failed = [r for r in reports if not r.passed]
        if verify:
            raise_if_failed(reports)
        for r in failed:
            log.warning(
                "--no-verify: %d %s parity failure(s) recorded in the manifest", len(r.failures), r.precision
            )
        ck.tokenizer.save(tmp / bundle_tokenizer_file(cfg))

        manifest_extra: dict[str, Any] = {**pixel_extra, **int8_extra}
        for step in steps:
            manifest_extra.update(step(tmp, {**manifest_extra, "model_config": cfg.to_dict()}))

        parity = {r.precision: r.to_dict() for r in reports}
        manifest = build_manifest(
            tmp,
            cfg,
            opset=opset,
            fp16=fp16,
            parity=parity,
            verified=bool(verify and not failed),
            checkpoint=ckpt.resolve(),
            checkpoint_sha256=sha256_file(ckpt / WEIGHTS),
            extra=manifest_extra,
        )
        write_manifest(tmp, manifest)
        _check_out(outp, ckpt, force)  # again: something may have appeared meanwhile
        _place(tmp, outp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "bundle written to %s in %.1f s (verified: %s)",
        outp,
        time.perf_counter() - started,
        manifest["verified"],
    )
    return outp
