"""Triton Python-backend model ``retriever``: two-stage MSSAN search served by one request.

Holds the galleries of a saved mssan_infer index (``index.json`` + ``.npy``
files, read with numpy, sha256-checked) and answers

- text -> image: input ``text`` (one caption);
- image -> text: input ``regions`` ``[R, Dv]`` (optional ``region_mask`` ``[R]``);

with optional ``k`` (default 10) and ``rerank`` (default 100; 0 = stage 1 only).
The query is encoded by the ``text_encoder`` / ``image_encoder`` model and the
top ``rerank`` stage-1 candidates rescored by the ``scorer`` model, both through
BLS (``pb_utils.InferenceRequest``). Outputs: ``ids`` (item ids as strings),
``scores`` (final score = stage 1 + s_ll) and ``stage1``, best first. The
ranking is the one of ``mssan_infer.Retriever.search``.

Parameters (config.pbtxt): ``index_dir`` (relative to this version folder or
absolute; the environment variable ``MSSAN_RETRIEVER_INDEX`` overrides it),
``bundle_id`` (the index must come from this bundle), ``scorer_batch``,
``verify_index``, ``image_encoder`` / ``text_encoder`` / ``scorer`` (model names).
Without an index the model still loads and answers every query with an error
saying where to put one. Imports numpy only.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tooling, tests)
    pb_utils = None

GALLERIES = {"images": "image gallery (searched by text)", "texts": "caption gallery (searched by images)"}


class QueryError(Exception):
    """A query the retriever refuses (reported to the client as the response error)."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extent(mask: np.ndarray) -> int:
    cols = np.flatnonzero((np.asarray(mask) > 0).any(0))
    return int(cols[-1]) + 1 if cols.size else 0


def _inside(root: str, name: str) -> str:
    path = os.path.realpath(os.path.join(root, name))
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") or not path.startswith(os.path.realpath(root) + os.sep):
        raise ValueError(f"index manifest names a file outside the index folder: {name!r}")
    return path


def load_index(folder: str, bundle_id: str | None, verify: bool = True) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Galleries of an mssan_infer index folder as float32 numpy arrays: ``{name: {"ids", "stage1", ...}}``."""
    with open(os.path.join(folder, "index.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != "mssan-index" or int(manifest.get("format_version", 0)) != 1:
        raise ValueError(f"{folder} is not an mssan index of format version 1")
    if bundle_id and manifest.get("bundle_id") != bundle_id:
        raise ValueError(
            f"index {folder} was built with bundle {manifest.get('bundle_id')}, but this repository serves bundle "
            f"{bundle_id}; rebuild the index with this bundle"
        )
    if verify:
        for name, digest in manifest["files"].items():
            if _sha256(_inside(folder, name)) != digest:
                raise ValueError(f"index file {name} does not match its sha256; copy the index again or rebuild it")
    galleries: dict[str, dict[str, Any]] = {}
    for gname, entry in manifest["galleries"].items():
        files = entry["files"]
        arrays = {a: np.load(_inside(folder, files[a]), allow_pickle=False) for a in ("stage1", "local", "mask", "gram")}
        with open(_inside(folder, files["ids"]), encoding="utf-8") as f:
            ids = json.load(f)
        galleries[gname] = {
            "ids": [str(i) for i in ids],
            "stage1": np.ascontiguousarray(arrays["stage1"], dtype=np.float32),
            "local": arrays["local"],                   # float32 or float16, widened per gather
            "mask": np.asarray(arrays["mask"], dtype=np.float32),
            "gram": arrays["gram"],
        }
    return galleries, manifest


class Tokenizer:
    """The mssan tokenizer (NFKC, lower case, apostrophes inside words dropped, word runs) from tokenizer.json."""

    def __init__(self, path: str) -> None:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        self.vocab: dict[str, int] = spec["vocab"]
        self.max_len = int(spec["max_len"])
        self.unk = int(spec.get("unk_id", 3))
        self.word = re.compile(spec["word_pattern"], re.UNICODE)
        self.apostrophes = re.compile(spec["apostrophe_pattern"], re.UNICODE)

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFKC", text).lower()
        words = self.word.findall(self.apostrophes.sub("", text))[: self.max_len]
        return [self.vocab.get(w, self.unk) for w in words]


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        cfg = json.loads(args["model_config"])
        p = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        here = os.path.join(args["model_repository"], str(args["model_version"]))
        self.models = {g: p.get(g) or g for g in ("image_encoder", "text_encoder", "scorer")}
        self.scorer_batch = max(1, int(p.get("scorer_batch") or 256))
        self.tokenizer = Tokenizer(os.path.join(here, p.get("tokenizer") or "tokenizer.json"))
        index_dir = os.environ.get("MSSAN_RETRIEVER_INDEX") or p.get("index_dir") or "index"
        self.index_dir = index_dir if os.path.isabs(index_dir) else os.path.join(here, index_dir)
        self.galleries: dict[str, dict[str, Any]] = {}
        self.missing = ""
        if os.path.isfile(os.path.join(self.index_dir, "index.json")):
            verify = (p.get("verify_index") or "true").lower() != "false"
            self.galleries, _ = load_index(self.index_dir, p.get("bundle_id") or None, verify)
            sizes = ", ".join(f"{k}: {len(v['ids'])}" for k, v in self.galleries.items())
            pb_utils.Logger.log_info(f"mssan retriever: index {self.index_dir} ({sizes})")
        else:
            self.missing = (
                f"no index at {self.index_dir}: save one with Retriever.save(...) and install it with "
                "export.triton.install_index(repo, index) or set MSSAN_RETRIEVER_INDEX"
            )
            pb_utils.Logger.log_warn(f"mssan retriever: {self.missing}")

    # ---- BLS -------------------------------------------------------------------
    def _infer(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=self.models[graph],
            requested_output_names=outputs,
            inputs=[pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in feeds.items()],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.models[graph]}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}

    # ---- search ----------------------------------------------------------------
    def _gallery(self, name: str) -> dict[str, Any]:
        if self.missing:
            raise QueryError(self.missing)
        g = self.galleries.get(name)
        if g is None or not g["ids"]:
            raise QueryError(f"the index has no {GALLERIES[name]}")
        return g

    def _search(
        self, q: dict[str, np.ndarray], g: dict[str, Any], query_is_text: bool, k: int, rerank: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s_all = (q["stage1"] @ g["stage1"].T)[0]                                  # [n]
        depth = min(max(k, rerank) if rerank > 0 else k, s_all.shape[0])
        rows = np.lexsort((np.arange(s_all.shape[0]), -s_all))[:depth]
        s1 = s_all[rows]
        if rerank <= 0:
            order = np.arange(min(k, depth))
            return rows[order], s1[order], s1[order]
        width = max(1, _extent(q["mask"]))
        q_local, q_mask, q_gram = q["local"][:, :width], q["mask"][:, :width], q["gram"][:, :width, :width]
        s_ll = np.empty(len(rows), np.float32)
        for a in range(0, len(rows), self.scorer_batch):
            part = rows[a : a + self.scorer_batch]
            srt = np.sort(part)
            inv = np.searchsorted(srt, part)
            mask = g["mask"][srt]
            w = max(1, _extent(mask))
            local = np.asarray(g["local"][srt, :w], dtype=np.float32)[inv]
            gram = np.asarray(g["gram"][srt, :w, :w], dtype=np.float32)[inv]
            mask = np.ascontiguousarray(mask[inv, :w])
            if query_is_text:
                feeds = {"img_local": local, "region_mask": mask, "img_gram": gram,
                         "txt_local": q_local, "token_mask": q_mask, "txt_gram": q_gram}
                s_ll[a : a + len(part)] = self._infer("scorer", feeds, ["s_ll"])["s_ll"][:, 0]
            else:
                feeds = {"img_local": q_local, "region_mask": q_mask, "img_gram": q_gram,
                         "txt_local": local, "token_mask": mask, "txt_gram": gram}
                s_ll[a : a + len(part)] = self._infer("scorer", feeds, ["s_ll"])["s_ll"][0, :]
        final = s1 + s_ll
        order = np.lexsort((rows, -final))[:k]
        return rows[order], final[order], s1[order]

    def _query(self, request: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
        def scalar(name: str, default: int) -> int:
            t = pb_utils.get_input_tensor_by_name(request, name)
            return default if t is None else int(np.asarray(t.as_numpy()).reshape(-1)[0])

        k, rerank = scalar("k", 10), scalar("rerank", 100)
        if k <= 0 or rerank < 0:
            raise QueryError(f"k must be > 0 and rerank >= 0, got k={k}, rerank={rerank}")
        text = pb_utils.get_input_tensor_by_name(request, "text")
        regions = pb_utils.get_input_tensor_by_name(request, "regions")
        if (text is None) == (regions is None):
            raise QueryError("give exactly one of the inputs 'text' (searches images) or 'regions' (searches captions)")
        if text is not None:
            raw = np.asarray(text.as_numpy()).reshape(-1)
            if raw.size != 1:
                raise QueryError(f"'text' must hold one caption, got {raw.size}")
            caption = raw[0].decode("utf-8") if isinstance(raw[0], bytes) else str(raw[0])
            tokens = self.tokenizer.encode(caption)
            if not tokens:
                raise QueryError(f"caption {caption[:60]!r} has no words")
            if all(t == self.tokenizer.unk for t in tokens):
                raise QueryError(f"caption {caption[:60]!r}: none of its words is in the model's vocabulary")
            g = self._gallery("images")
            feeds: dict[str, np.ndarray] = {
                "tokens": np.asarray([tokens], np.int64), "token_mask": np.ones((1, len(tokens)), np.float32)}
            out = self._infer("text_encoder", feeds, ["txt_stage1", "txt_local", "txt_gram"])
            q = {"stage1": out["txt_stage1"], "local": out["txt_local"], "gram": out["txt_gram"],
                 "mask": feeds["token_mask"]}
            rows, final, s1 = self._search(q, g, True, k, rerank)
        else:
            feats = np.asarray(regions.as_numpy(), dtype=np.float32)
            if feats.ndim == 3 and feats.shape[0] == 1:
                feats = feats[0]
            if feats.ndim != 2:
                raise QueryError(f"'regions' must be [R, Dv] features of one image, got shape {feats.shape}")
            m = pb_utils.get_input_tensor_by_name(request, "region_mask")
            mask = np.ones(feats.shape[0], np.float32) if m is None else np.asarray(m.as_numpy(), np.float32).reshape(-1)
            if mask.shape[0] != feats.shape[0]:
                raise QueryError(f"'region_mask' must be [{feats.shape[0]}], got {mask.shape}")
            if not (mask > 0).any():
                raise QueryError("the image has no regions (region_mask all zero)")
            if not np.isfinite(feats[mask > 0]).all():
                raise QueryError("image features contain NaN or inf")
            g = self._gallery("texts")
            w = max(1, _extent(mask[None]))
            feeds = {"regions": feats[None, :w], "region_mask": mask[None, :w]}
            out = self._infer("image_encoder", feeds, ["img_stage1", "img_local", "img_gram"])
            q = {"stage1": out["img_stage1"], "local": out["img_local"], "gram": out["img_gram"],
                 "mask": feeds["region_mask"]}
            rows, final, s1 = self._search(q, g, False, k, rerank)
        return [g["ids"][int(r)] for r in rows], final.astype(np.float32), s1.astype(np.float32)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                ids, scores, stage1 = self._query(request)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("ids", np.array([i.encode("utf-8") for i in ids], dtype=np.object_)),
                    pb_utils.Tensor("scores", scores),
                    pb_utils.Tensor("stage1", stage1),
                ]))
            except Exception as e:  # noqa: BLE001 - reported to the client
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses
