"""Triton Python-backend model ``retriever``: two-stage MSSAN search served by one request.

Holds the galleries of a saved mssan_infer index and answers

- text -> image: input ``text`` (one caption);
- image -> text: input ``regions`` ``[R, Dv]`` (optional ``region_mask`` ``[R]``), or input ``image``:
  the encoded bytes of one image file (JPEG, PNG, WebP...; raw, or as base64 text, which is what a
  KServe v2 JSON body can carry, optionally a ``data:`` URL), when the repository was written from a
  bundle with the pixel graph (``export --pixels``);

with optional ``k`` (default 10) and ``rerank`` (default 100; 0 = stage 1 only).
The query is encoded by the ``text_encoder`` / ``image_encoder`` / ``image_encoder_pixels`` model and
the top ``rerank`` stage-1 candidates rescored by the ``scorer`` model, both through
BLS (``pb_utils.InferenceRequest``), or, with ``graphs: local``, by ONNX Runtime
sessions in this model's own process on the ``model.onnx`` files of those models. An image is
decoded and preprocessed here, by the runtime's own code (:mod:`mssan_infer.images.preprocess`), with
the bundle's preprocessing constants (parameter ``image_preprocessing``).
Outputs, best first: ``ids`` (each item id's text, ``str(id)``), ``scores`` (final score =
stage 1 + s_ll), ``stage1``, ``texts`` (each hit's caption text, ``""`` when it has none),
``sources`` (the file an image was indexed from, ``""`` when none) and ``metadata`` (each hit's
metadata as one JSON object, ``{}`` when none). A bad request (a missing or unknown
input, an empty caption, ``k < 1``, an image that does not decode...) is answered with
``INVALID_ARG`` (HTTP 400).

``graphs`` (config parameter): ``bls`` calls the models; ``local`` runs their ONNX
files here (CPU), saving two round trips through the server per query (on CPU each
costs more than the graph it runs); ``auto`` (the default) is ``local`` when
onnxruntime imports here, the three models have a ``model.onnx`` and no NVIDIA GPU
is visible, and ``bls`` otherwise. The choice is logged when the model loads.

Everything but the BLS calls is mssan_infer's own code: ``export --triton`` copies the
``mssan_infer`` package beside this file (:mod:`mssan_infer.triton`), so index loading and
checks, the tokenizer, input checks, stage 1, candidate gathering and the final ordering are
the very code ``Retriever.search`` runs, and the two rank identically, ties included. It needs
numpy (and onnxruntime for ``graphs: local``), never torch, inside NVIDIA's container.

Parameters (config.pbtxt): ``index_dir`` (relative to this version folder or
absolute; the environment variable ``MSSAN_RETRIEVER_INDEX`` overrides it),
``mssan_bundle_id`` (the index must come from this bundle), ``scorer_batch``,
``scorer_limits`` (JSON ``{"Ni", "Nt", "R", "L"}``: the scorer engine's maxima,
for TensorRT engines), ``verify_index``, ``tokenizer``, ``graphs``,
``gallery`` (Qdrant galleries instead of the index, e.g. ``qdrant:http://qdrant:6333?prefix=photos``;
the environment variable ``MSSAN_RETRIEVER_GALLERY`` overrides it; ``embed_size`` is the bundle's D),
``intra_op_thread_count`` (ONNX Runtime threads with ``graphs: local``; 0 = its
default), ``image_encoder`` / ``text_encoder`` / ``scorer`` / ``image_encoder_pixels`` (model names) and
``image_preprocessing`` (the manifest's ``preprocessing.image``, JSON; empty without the pixel graph).
Without an index the model still loads and answers every query with an error saying where to put one.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from mssan_infer import checks, names
from mssan_infer.backends.onnxruntime import OnnxGraph, import_onnxruntime
from mssan_infer.errors import BackendUnavailableError, BundleError, IndexFileError, InputError
from mssan_infer.files import safe_member
from mssan_infer.gallery.base import Gallery, GalleryView, ItemRecord, extent, id_text
from mssan_infer.gallery.folder import load_index
from mssan_infer.images.preprocess import Preprocessing, preprocess
from mssan_infer.qdrant.options import parse_gallery
from mssan_infer.qdrant.places import open_qdrant_galleries
from mssan_infer.search import Encoded, ScorerLimits, pairs_score_fn, search
from mssan_infer.spec import IMAGE_ENCODER_PIXELS
from mssan_infer.text.base import load_text_tokenizer

GRAPH_MODES = ("auto", "local", "bls")
PIXELS = IMAGE_ENCODER_PIXELS.name
_BASE64 = re.compile(rb"[A-Za-z0-9+/=\s]+")
NO_PIXEL_GRAPH = (
    "this repository was written from a bundle without the pixel graph, so the retriever cannot take "
    "image files: send region features in 'regions', or re-export the bundle with the pixel graph "
    "(`python -m export --checkpoint CKPT --out DIR --pixels --features DATA --backbone-weights PATH "
    "--triton`) and serve that"
)


def image_bytes(value: bytes) -> bytes:
    """The image file's bytes from the ``image`` input: raw bytes as sent, or base64 text (what a JSON
    request can carry; whitespace ignored), optionally as a ``data:image/...;base64,`` URL.

    Raises:
        InputError: an empty input, or a ``data:`` URL that is not valid base64.
    """
    if not value:
        raise InputError("'image' is empty; send the bytes of one image file (JPEG, PNG, WebP...)")
    if value[:5].lower() == b"data:":
        head, comma, body = value.partition(b",")
        try:
            if not comma or not head.lower().endswith(b";base64"):
                raise ValueError("not a base64 data: URL")
            return base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
        except (ValueError, binascii.Error) as e:
            raise InputError(
                f"'image' is a data: URL but not 'data:<type>;base64,<base64>' ({e}); send the file's bytes "
                "or its base64"
            ) from None
    if _BASE64.fullmatch(value):  # image files are binary: text of base64 letters only is base64
        try:
            return base64.b64decode(re.sub(rb"\s+", b"", value), validate=True)
        except (ValueError, binascii.Error):
            pass  # not base64 after all: decoded as an image file below (and refused there if it is not one)
    return value


def choose_graphs(mode: str, files: dict[str, str], gpu_visible: bool) -> tuple[str, str]:
    """``("local" | "bls", reason)`` for the ``graphs`` parameter ``mode``, given each graph's ``model.onnx``.

    Raises:
        InputError: an unknown mode, or ``local`` without onnxruntime or without the ONNX files.
    """
    if mode not in GRAPH_MODES:
        raise InputError(f"parameter graphs must be one of {GRAPH_MODES}, got {mode!r}")
    if mode == "bls":
        return "bls", "graphs: bls"
    missing = [g for g, f in files.items() if not os.path.isfile(f)]
    try:
        import_onnxruntime()
        ort = ""
    except BackendUnavailableError as e:
        ort = str(e)
    if mode == "local":
        if missing or ort:
            raise InputError(
                "graphs: local needs onnxruntime in the server's Python and each model's model.onnx; "
                + (f"missing {missing}" if missing else f"onnxruntime: {ort}")
                + "; set graphs: bls"
            )
        return "local", "graphs: local"
    if missing:
        return "bls", f"no model.onnx for {missing}"
    if ort:
        return "bls", "onnxruntime is not installed in the server's Python"
    if gpu_visible:
        return "bls", "an NVIDIA GPU is visible (the models may run on it)"
    return "local", "CPU only, onnxruntime available"


def hit_outputs(
    records: list[ItemRecord], scores: np.ndarray, stage1: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    """The retriever's outputs for hits (best first), in ``names.RETRIEVER_OUTPUTS`` order: ``ids``
    (``str(id)``), ``scores``, ``stage1``, ``texts`` and ``sources`` (``""`` where a hit has none) and
    ``metadata`` (one JSON object per hit, ``{}`` where it has none); text outputs are UTF-8 bytes."""

    def text(values: list[str]) -> np.ndarray:
        return np.array([v.encode("utf-8") for v in values], dtype=np.object_).reshape(len(values))

    values = (
        text([id_text(r.id) for r in records]),
        np.asarray(scores, np.float32),
        np.asarray(stage1, np.float32),
        text([r.text or "" for r in records]),
        text([r.source or "" for r in records]),
        text([json.dumps(r.metadata or {}, ensure_ascii=False) for r in records]),
    )
    return list(zip(names.RETRIEVER_OUTPUTS, values))


try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tooling, tests)
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        cfg = json.loads(args["model_config"])
        p = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        here = os.path.join(args["model_repository"], str(args["model_version"]))
        prep = p.get(names.IMAGE_PREPROCESSING_PARAM) or ""
        self.pixels = Preprocessing.from_dict(json.loads(prep)) if prep else None
        graphs = ("image_encoder", "text_encoder", "scorer") + ((PIXELS,) if self.pixels else ())
        self.models = {g: p.get(g) or g for g in graphs}
        self.scorer_batch = checks.positive_int("scorer_batch", int(p.get("scorer_batch") or 256))
        axes = json.loads(p.get(names.SCORER_LIMITS_PARAM) or "{}")
        # per direction, once: a text query scores images (the scorer's Ni axis), an image query captions (Nt)
        self.limits = {t: ScorerLimits.from_axes(axes, query_is_text=t) for t in (True, False)}
        self.img_dim = next(int(i["dims"][-1]) for i in cfg["input"] if i["name"] == "regions")
        repo = os.path.dirname(os.path.abspath(args["model_repository"]))
        files = {g: os.path.join(repo, m, "1", "model.onnx") for g, m in self.models.items()}
        self.mode, why = choose_graphs(p.get("graphs") or "auto", files, os.path.exists("/dev/nvidiactl"))
        threads = int(p.get("intra_op_thread_count") or 0)
        self.graphs = (
            {g: OnnxGraph(f, threads=threads) for g, f in files.items()} if self.mode == "local" else {}
        )
        pb_utils.Logger.log_info(
            f"mssan retriever: graphs run {'here (ONNX Runtime)' if self.graphs else 'through BLS'} ({why}); "
            + ("image files in 'image' accepted" if self.pixels else "no pixel graph: 'image' is refused")
        )
        with open(os.path.join(here, p.get("tokenizer") or names.RETRIEVER_TOKENIZER), encoding="utf-8") as f:
            # word (vocabulary inline) or subword (a Hugging Face tokenizer.json beside it, `tokenizers`
            # needed)
            self.tokenizer = load_text_tokenizer(
                json.load(f),
                lambda name: safe_member(Path(here), name, BundleError),
                "the retriever's tokenizer.json",
            )
        index_dir = os.environ.get("MSSAN_RETRIEVER_INDEX") or p.get("index_dir") or "index"
        self.index_dir = index_dir if os.path.isabs(index_dir) else os.path.join(here, index_dir)
        self.galleries: dict[str, Gallery] = {}
        self.missing = ""
        gallery = os.environ.get("MSSAN_RETRIEVER_GALLERY") or p.get("gallery") or ""
        if gallery:  # galleries in Qdrant (e.g. a server shared by replicas)
            from_env = bool(os.environ.get("MSSAN_RETRIEVER_GALLERY"))
            spec = parse_gallery(gallery, name="MSSAN_RETRIEVER_GALLERY" if from_env else "parameter gallery")
            d = int(p["embed_size"])
            if (
                spec is not None
            ):  # served, never created here: `python -m mssan_infer index --gallery` makes them
                self.galleries = dict(
                    open_qdrant_galleries(
                        dataclasses.replace(spec, create=False),
                        (names.IMAGES, names.TEXTS),
                        2 * d,
                        d,
                        p.get(names.BUNDLE_ID_PARAM) or "",
                    )
                )
                pb_utils.Logger.log_info(f"mssan retriever: galleries in {gallery}")
        elif os.path.isfile(os.path.join(self.index_dir, names.INDEX_MANIFEST)):
            verify = (p.get("verify_index") or "true").lower() != "false"
            index, _ = load_index(
                self.index_dir, bundle_id=p.get(names.BUNDLE_ID_PARAM) or None, verify=verify
            )
            self.galleries = dict(index)
            sizes = ", ".join(f"{k}: {len(v)}" for k, v in self.galleries.items())
            pb_utils.Logger.log_info(f"mssan retriever: index {self.index_dir} ({sizes})")
        else:
            self.missing = (
                f"no index at {self.index_dir}: build one with `python -m mssan_infer index` (or "
                "Retriever.save) and "
                "serve it with `python -m mssan_infer serve --index DIR`, set MSSAN_RETRIEVER_INDEX=DIR in "
                "the "
                "server's environment, or copy it in with `python -m export ... --triton-index DIR` "
                "(export.triton.install_index); or set MSSAN_RETRIEVER_GALLERY to Qdrant galleries"
            )
            pb_utils.Logger.log_warn(f"mssan retriever: {self.missing}")

    # ---- BLS -------------------------------------------------------------------
    def _infer(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        local = self.graphs.get(graph)
        if local is not None:
            return local.run(feeds, outputs)
        request = pb_utils.InferenceRequest(
            model_name=self.models[graph],
            requested_output_names=outputs,
            inputs=[pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in feeds.items()],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.models[graph]}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}

    def _encode(self, graph: str, feeds: dict[str, np.ndarray], prefix: str, mask: np.ndarray) -> Encoded:
        out = self._infer(graph, feeds, [f"{prefix}_stage1", f"{prefix}_local", f"{prefix}_gram"])
        return Encoded(out[f"{prefix}_stage1"], out[f"{prefix}_local"], mask, out[f"{prefix}_gram"])

    # ---- search ----------------------------------------------------------------
    def _view(self, name: str) -> GalleryView:
        if self.missing:
            raise IndexFileError(self.missing)
        g = self.galleries.get(name)
        # one snapshot, whose n is counted once (for a Qdrant server: one count request per query)
        view = g.view() if g is not None else None
        if view is None or view.n == 0:
            raise InputError(f"the index has no {names.GALLERIES[name]}")
        return view

    def _image_query(self, tensor: Any) -> Encoded:
        """Encode the image file sent in the input ``image`` with the pixel graph."""
        if self.pixels is None:
            raise InputError(NO_PIXEL_GRAPH)
        raw = np.asarray(tensor.as_numpy()).reshape(-1)
        if raw.size != 1:
            raise InputError(f"'image' must hold one image file, got {raw.size}")
        value = raw[0]
        data = value if isinstance(value, bytes) else str(value).encode("utf-8")
        pixels = preprocess(image_bytes(data), self.pixels, "the 'image' input")[None]
        out = self._infer(PIXELS, {"pixels": pixels}, ["img_stage1", "img_local", "img_gram"])
        mask = np.ones(out["img_local"].shape[:2], np.float32)  # every grid cell is a region
        return Encoded(out["img_stage1"], out["img_local"], mask, out["img_gram"])

    def _query(self, request: Any) -> tuple[list[ItemRecord], np.ndarray, np.ndarray]:
        def scalar(name: str, default: int) -> int:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                return default
            v = np.asarray(t.as_numpy()).reshape(-1)
            if v.size != 1:
                raise InputError(f"'{name}' must hold one integer, got {v.size} values")
            return int(v[0])

        k, rerank = checks.check_k(scalar("k", 10), scalar("rerank", 100))
        text = pb_utils.get_input_tensor_by_name(request, "text")
        regions = pb_utils.get_input_tensor_by_name(request, "regions")
        image = pb_utils.get_input_tensor_by_name(request, "image")
        if sum(t is not None for t in (text, regions, image)) != 1:
            raise InputError(
                "give exactly one of the inputs 'text' (searches images), 'image' (an image file) or "
                "'regions' (region features; both search captions)"
            )
        if text is not None:
            raw = np.asarray(text.as_numpy()).reshape(-1)
            if raw.size != 1:
                raise InputError(f"'text' must hold one caption, got {raw.size}")
            try:
                caption = raw[0].decode("utf-8") if isinstance(raw[0], bytes) else str(raw[0])
            except UnicodeDecodeError as e:
                raise InputError(f"'text' must be UTF-8: {e}") from None
            tokens = checks.token_ids(self.tokenizer, [caption])[0]
            view = self._view(names.IMAGES)
            mask = np.ones((1, len(tokens)), np.float32)
            q = self._encode(
                "text_encoder", {"tokens": np.asarray([tokens], np.int64), "token_mask": mask}, "txt", mask
            )
        elif image is not None:
            view = self._view(names.TEXTS)
            q = self._image_query(image)
        else:
            feats = np.asarray(regions.as_numpy())
            if feats.ndim == 3 and feats.shape[0] == 1:
                feats = feats[0]
            if feats.ndim != 2:
                raise InputError(f"'regions' must be [R, Dv] features of one image, got shape {feats.shape}")
            m = pb_utils.get_input_tensor_by_name(request, "region_mask")
            mask_in = None if m is None else np.asarray(m.as_numpy(), np.float32).reshape(1, -1)
            batch, mask = checks.region_batch(feats[None], mask_in, self.img_dim)
            view = self._view(names.TEXTS)
            w = max(1, extent(mask))
            q = self._encode(
                "image_encoder", {"regions": batch[:, :w], "region_mask": mask[:, :w]}, "img", mask[:, :w]
            )
        query_is_text = text is not None
        ranked = search(
            q,
            view,
            pairs_score_fn(
                lambda feeds: self._infer("scorer", feeds, ["s_ll"])["s_ll"], query_is_text=query_is_text
            ),
            query_is_text=query_is_text,
            k=k,
            rerank=rerank,
            batch=self.scorer_batch,
            limits=self.limits[query_is_text],
        )[0]
        return view.records_at(ranked.rows), ranked.score, ranked.stage1

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                records, scores, stage1 = self._query(request)
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor(name, value)
                            for name, value in hit_outputs(records, scores, stage1)
                        ]
                    )
                )
            except InputError as e:  # the request is wrong: HTTP 400 / gRPC INVALID_ARGUMENT
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[],
                        error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG),
                    )
                )
            except Exception as e:  # noqa: BLE001 - reported to the client (HTTP 500)
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
                )
        return responses
