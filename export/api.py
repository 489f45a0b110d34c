"""``export_bundle``: checkpoint folder -> verified bundle folder (DESIGN §5)."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import onnx

from mssan_infer.errors import BundleError, MssanError
from mssan_infer.files import (
    link_or_copy,
    read_versioned_json,
    recover_swap,
    safe_member,
    sha256_file,
    swap_in,
)
from mssan_infer.names import MANIFEST_FILE, TENSORRT_KEY, plan_name
from mssan_infer.spec import GRAPHS
from training.checkpoint import WEIGHTS, load_checkpoint

from .deployment_step import DeploymentStep
from .errors import ExportError
from .fp16 import convert_to_fp16
from .graphs import build_graphs
from .inputs import example_feeds
from .manifest import (
    FP16_DIR,
    FileKey,
    build_manifest,
    bundle_tokenizer_file,
    file_key,
    hash_files,
    write_manifest,
)
from .onnx import DEFAULT_OPSET, MIN_OPSET, check_onnx, export_graph
from .query_scorers import check_fast_recall, export_query_scorers
from .validate import ParityReport, raise_if_failed, validate_graphs

__all__ = ["export_bundle", "add_to_bundle", "bundle_parts"]

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


def bundle_parts(root: Path) -> list[str]:
    """What the bundle at ``root`` holds beyond its fp32 graphs, in words (for messages); ``[]`` when
    its manifest cannot be read."""
    try:
        m = read_versioned_json(root / MANIFEST_FILE, error=BundleError, fix="re-export the bundle")
    except MssanError:
        return []
    parts = ["fp32 graphs"]
    if m.get("fp16_graphs"):
        parts.append("fp16 graphs")
    if m.get("int8_graphs"):
        parts.append("the int8 text encoder")
    if (m.get("optional_graphs") or {}).get("image_encoder_pixels"):
        parts.append("the pixel graph")
    if m.get(TENSORRT_KEY):
        parts.append("TensorRT engines (tensorrt/)")
    if m.get("triton"):
        parts.append("a Triton repository (triton/)")
    return parts


def _check_out(out: Path, checkpoint: Path | None, overwrite: bool, *, warn: bool = True) -> None:
    """The one rule for ``--out``: a new or empty folder is written; an existing bundle is replaced only
    with ``overwrite``; anything else (and the checkpoint) is never replaced.

    ``warn``: log that ``overwrite`` replaces a bundle (the check before the build says it; the one
    before the swap does not repeat it).

    Raises:
        ExportError: ``out`` is (or holds) the checkpoint, is a bundle and ``overwrite`` is off, or
            exists and is not a bundle.
    """
    dst = out.resolve()
    if checkpoint is not None:
        ck = checkpoint.resolve()
        if dst == ck or dst in ck.parents:
            raise ExportError(f"--out {out} would replace the checkpoint {checkpoint}; choose another folder")
    if not out.exists() and not out.is_symlink():
        return
    is_dir = out.is_dir() and not out.is_symlink()
    if is_dir and not any(out.iterdir()):
        return  # an empty folder: written
    if is_dir and (out / MANIFEST_FILE).is_file():
        parts = ", ".join(bundle_parts(out)) or "a bundle"
        if overwrite:
            if warn:
                log.warning("--overwrite: replacing the bundle at %s (%s)", out, parts)
            return
        raise ExportError(
            f"--out {out} already holds a bundle ({parts}); refusing to replace it. Pass --overwrite to "
            "replace all of it, or --add tensorrt / --add triton to add a deployment part and keep the "
            "rest (python -m export --out DIR --add triton), or choose a new folder"
        )
    raise ExportError(
        f"--out {out} exists and is not an export bundle (no {MANIFEST_FILE}); refusing to replace it "
        "(not even with --overwrite, which replaces bundles only). Choose a new folder, or remove it first"
    )


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
    overwrite: bool = False,
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
        out: the bundle folder: a new or empty folder. An existing bundle is replaced (with
            everything in it: ``triton/``, ``tensorrt/``) only with ``overwrite``; any other existing
            path is never replaced. ``add_to_bundle`` adds a deployment part to a bundle instead.
        opset: ONNX opset of the exported graphs.
        fp16: also write fp16 variants (matrix products in fp16, the rest fp32) under ``fp16/``.
        atol: overrides the fp32 parity tolerance (``TOLERANCES["fp32"].atol``).
        verify: make parity failures fatal. With ``False`` parity is still measured and
            recorded, and the manifest says ``"verified": false``.
        tensorrt: also build TensorRT engines under ``tensorrt/`` (True, or an
            ``export.tensorrt.TensorRTSettings``); needs tensorrt and a GPU.
        triton: also write a Triton model repository ``triton/`` (True, or an
            ``export.triton.TritonSettings``). See docs/deployment.md.
        overwrite: replace a bundle already at ``out`` (atomically: the old one stays until the new
            one is complete).
        pixels: also write ``image_encoder_pixels.onnx`` (``backbone`` with ``backbone_weights``, then
            the image encoder) taking ``[B,3,H,W]`` pixels preprocessed as ``image_size``/``resize``
            say (recorded in the manifest); see ``export.pixels``. Defaults: resnet152 at 448, or
            what ``features`` (the ``features.json`` of the training features) records; the
            weights' sha256 is checked against it.
        int8: also write ``int8/text_encoder.onnx`` (ONNX Runtime's CPU fusions, then dynamic int8
            quantization of MatMul/Gemm weights; ``export.int8``), gated by top-10 agreement of a
            rerank and the R@1 ratio on a dev split: ``int8_data``'s, else that of the training data
            the checkpoint records (``export.int8.gate_data``). A model too weak for the ratio to mean
            anything is refused (``ExportError``; with ``verify=False`` int8 is written unverified).
        int8_data: a precomp folder whose ``dev`` split (``test`` if it has none) the int8 gate runs on.
    Returns:
        The bundle folder.
    Raises:
        BundleError: the checkpoint folder is missing or damaged.
        ExportError: ``out`` must not be replaced, an exporter/ONNX checker failure, or (``int8`` with
            ``verify``) a model too weak for the int8 gate to judge.
        BackendUnavailableError: ``tensorrt`` asked for without tensorrt/cuda-python/GPU.
        ParityError: (with ``verify``) the graphs disagree with PyTorch past tolerance.
    """
    if atol is not None and not (isinstance(atol, (int, float)) and atol > 0):
        raise ExportError(f"atol must be a positive number, got {atol!r}")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(
            f"opset must be an integer >= {MIN_OPSET}, got {opset!r}; the default is {DEFAULT_OPSET}"
        )
    ckpt, outp = Path(checkpoint), Path(out)
    recover_swap(outp, MANIFEST_FILE)  # a bundle that a replace killed between two renames left aside
    _check_out(outp, ckpt, overwrite)
    steps = [
        _deployment_step(t, None if on is True else on)
        for t, on in (("tensorrt", tensorrt), ("triton", triton))
        if on
    ]
    started = time.perf_counter()
    ck = load_checkpoint(ckpt)
    model, cfg = ck.model.eval(), ck.model.cfg
    int8_gate = None
    if int8:  # the gate's split first: a missing one fails before the long export
        from .int8 import gate_data

        int8_gate = gate_data(model, int8_data, ck.state.get("data"), ckpt)
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
        scorer_report, scorer_paths = export_query_scorers(model, tmp, opset=opset, atol=atol)
        reports.append(scorer_report)
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

            int8_report, int8_extra = export_int8(model, ck.tokenizer, paths, tmp, data=int8_gate)
            reports.append(int8_report)
            # the fast path (int8 text encoder, int8 layout, int8 query scorers) on the same split
            fast = check_fast_recall(
                model,
                ck.tokenizer,
                tmp / int8_extra["int8_graphs"]["text_encoder"]["file"],
                scorer_paths,
                int8_gate,
            )
            scorer_report.notes["fast_path_recall"] = fast
            scorer_report.contract += fast["failures"]
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
        for r in failed:  # recorded, never "verified"
            log.warning(
                "--no-verify: %s not passed, recorded in the manifest: %s", r.precision, "; ".join(r.reasons)
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
        _check_out(outp, ckpt, overwrite, warn=False)  # again: something may have appeared meanwhile
        swap_in(tmp, outp)  # commits, or raises with what was at outp in place
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


ADD_PARTS = ("tensorrt", "triton")  # what add_to_bundle adds, in the order it runs them


def _installed_index(root: Path) -> Path | None:
    """The index installed in the bundle's Triton ``retriever`` model (``export --triton-index``), if any."""
    from .triton import REPOSITORY_DIR, RETRIEVER

    index = root / REPOSITORY_DIR / RETRIEVER / "1" / "index"
    return index if index.is_dir() else None


def add_to_bundle(
    bundle: str | os.PathLike[str],
    *,
    tensorrt: Any = False,
    triton: Any = False,
    checkpoint: str | os.PathLike[str] | None = None,
) -> Path:
    """Add deployment parts to an existing bundle and keep everything else.

    The graphs (fp32, fp16, int8, pixels), the tokenizer, the parity reports and the bundle id are
    kept as they are; ``tensorrt`` (re)builds ``tensorrt/`` from the bundle's graphs, ``triton``
    (re)writes ``triton/`` (an index installed in its ``retriever`` model is kept unless the settings
    install another). The other part is kept. The bundle is copied beside itself, the parts are added
    to the copy, the manifest records them (``added``), and the copy replaces the bundle only when all
    of it succeeded: a failure leaves the bundle as it was.

    Args:
        bundle: a bundle folder written by ``export_bundle``.
        tensorrt: True or an ``export.tensorrt.TensorRTSettings``: build TensorRT engines (fp16 ones
            only when its ``precisions`` ask, which needs the bundle's fp16 graphs).
        triton: True or an ``export.triton.TritonSettings``: write the Triton repository.
        checkpoint: optional; when given it must be the checkpoint the bundle was exported from.
    Returns:
        The bundle folder.
    Raises:
        BundleError: ``bundle`` is not a bundle, or is damaged.
        ExportError: nothing to add, a checkpoint other than the bundle's, fp16 engines without fp16
            graphs, a Triton repository of TensorRT engines that would go stale, or a step's failure.
        BackendUnavailableError: ``tensorrt`` without tensorrt/cuda-python/GPU.
        ParityError: the engines disagree with ONNX Runtime (nothing is added).
    """
    from mssan_infer.bundle import load_bundle

    root = Path(bundle)
    asked = [(t, on) for t, on in (("tensorrt", tensorrt), ("triton", triton)) if on]
    if not asked:
        raise ExportError("--add needs a part to add: --add tensorrt and/or --add triton")
    recover_swap(root, MANIFEST_FILE)  # a bundle that a replace killed between two renames left aside
    if not (root / MANIFEST_FILE).is_file():
        raise ExportError(
            f"--add adds to an existing bundle, and {root} is not one (no {MANIFEST_FILE}); export it first: "
            f"python -m export --checkpoint CKPT --out {root}"
        )
    read = sha256_file(root / MANIFEST_FILE)  # the bundle as read: it must still be there at the swap
    loaded = load_bundle(root)  # every file's sha256 checked
    manifest: dict[str, Any] = dict(loaded.manifest.raw)
    # the files as verified (a hard link in the copy is the same file: its sha256 is reused, not recomputed)
    verified = _verified_files(root, loaded.manifest.files)
    _refuse_if_changed(root, read)
    if checkpoint is not None:
        weights = Path(checkpoint) / WEIGHTS
        if not weights.is_file():
            raise ExportError(f"--checkpoint {checkpoint} is not a checkpoint folder ({WEIGHTS} is missing)")
        source = manifest.get("source_checkpoint") or {}
        if source.get("sha256") and sha256_file(weights) != source["sha256"]:
            raise ExportError(
                f"--checkpoint {checkpoint} is not the checkpoint the bundle {root} was exported from "
                f"({source.get('path')}); --add keeps the bundle's graphs. Re-export with --overwrite to "
                "use this checkpoint"
            )
    names = [t for t, _ in asked]
    if tensorrt:
        precisions = tuple(getattr(tensorrt, "precisions", ("fp32",)))
        if "fp16" in precisions and not manifest.get("fp16_graphs"):
            raise ExportError(
                f"fp16 TensorRT engines need the bundle's fp16 graphs, and {root} has none; re-export with "
                "--fp16 --overwrite, or add fp32 engines only (--add tensorrt without --fp16)"
            )
        served = (manifest.get("triton") or {}).get("settings") or {}
        if served.get("backend") == "tensorrt" and not triton:
            raise ExportError(
                "the bundle's Triton repository serves its TensorRT engines (--triton-backend tensorrt), "
                "which --add tensorrt rebuilds: add both, "
                "--add tensorrt --add triton --triton-backend tensorrt"
            )
    steps = [(t, _deployment_step(t, None if on is True else on)) for t, on in asked]
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _copy_kept(root, tmp, tensorrt=bool(tensorrt), triton=bool(triton))
        extra: dict[str, Any] = {}
        for name, step in steps:
            if name == "tensorrt":
                old = sorted((root / _ENGINES).glob("*.plan"))  # not copied: the engines of the old build go
                if old:
                    log.info("--add tensorrt: replacing %d engine(s) in %s", len(old), root / _ENGINES)
            if name == "triton" and manifest.get("triton"):
                log.info("--add triton: replacing the Triton repository in %s", root)
            extra.update(step(tmp, {**manifest, **extra}))
            if name == "triton":
                from .triton import REPOSITORY_DIR, install_index

                settings = None if triton is True else triton
                kept = _installed_index(root)
                if kept is not None and getattr(settings, "index", None) is None:
                    install_index(tmp / REPOSITORY_DIR, kept, link=True)
                    log.info("--add triton: kept the index installed in the old repository")
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        manifest.update(extra)
        manifest["added"] = [*manifest.get("added", []), *({"part": n, "created": now} for n in names)]
        manifest["files"] = hash_files(tmp, known=verified)
        write_manifest(tmp, manifest)
        _refuse_if_changed(root, read)  # a concurrent --add or --overwrite is never silently undone
        swap_in(tmp, root)  # commits, or raises with the bundle as it was
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("added %s to %s in %.1f s", " and ".join(names), root, time.perf_counter() - started)
    return root


_ENGINES = Path(plan_name("scorer", "fp32")).parent.as_posix()  # the bundle's folder of TensorRT engines


def _verified_files(root: Path, files: Mapping[str, str]) -> dict[FileKey, str]:
    """{the identity of a file of the bundle at ``root``: its sha256 in the manifest} (just verified)."""
    out: dict[FileKey, str] = {}
    for name, digest in files.items():
        try:
            out[file_key(safe_member(root, name))] = digest
        except (OSError, MssanError):
            continue
    return out


def _refuse_if_changed(root: Path, read: str) -> None:
    """Raises: ExportError when the manifest at ``root`` is no longer the one whose sha256 is ``read``."""
    try:
        now = sha256_file(root / MANIFEST_FILE)
    except OSError:
        now = None
    if now != read:
        raise ExportError(
            f"the bundle at {root} changed while --add ran (another `python -m export --add` or --overwrite "
            "replaced it); nothing was added, so that change is kept. Run --add again on the bundle as it "
            "is now"
        )


def _copy_kept(root: Path, tmp: Path, *, tensorrt: bool, triton: bool) -> None:
    """Copy the bundle ``root`` into ``tmp`` with hard links (copies across devices), less what is rebuilt.

    ``tensorrt``: the old engines are left out, and the rest of ``tensorrt/`` (the timing cache, which the
    build updates) is copied, never linked. ``triton``: ``triton/`` is left out (rewritten; its installed
    index is linked back by ``install_index``). Every other file of the copy is the bundle's own file:
    the steps only add or replace files, never write into one.
    """
    skipped: set[str] = set()
    if triton:
        from .triton import REPOSITORY_DIR

        skipped.add(REPOSITORY_DIR)

    def rel(path: str) -> tuple[str, ...]:
        return Path(path).relative_to(root).parts

    def ignore(folder: str, names: list[str]) -> set[str]:
        where = rel(folder)
        if not where:
            return skipped & set(names)
        if tensorrt and where == (_ENGINES,):
            return {n for n in names if n.endswith(".plan")}
        return set()

    def copy(src: str, dst: str) -> object:
        if tensorrt and rel(src)[0] == _ENGINES:
            return shutil.copy2(src, dst)
        return link_or_copy(src, dst)

    shutil.copytree(root, tmp, dirs_exist_ok=True, symlinks=True, ignore=ignore, copy_function=copy)
