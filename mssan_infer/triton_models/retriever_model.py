"""Triton Python-backend model ``retriever``: two-stage MSSAN search served by one request.

Holds the galleries of a saved mssan_infer index and answers

- text -> image: input ``text`` (one caption);
- image -> text: input ``regions`` ``[R, Dv]`` (optional ``region_mask`` ``[R]``);

with optional ``k`` (default 10) and ``rerank`` (default 100; 0 = stage 1 only).
The query is encoded by the ``text_encoder`` / ``image_encoder`` model and the
top ``rerank`` stage-1 candidates rescored by the ``scorer`` model, both through
BLS (``pb_utils.InferenceRequest``). Outputs: ``ids`` (item ids as strings),
``scores`` (final score = stage 1 + s_ll) and ``stage1``, best first.

Everything but the BLS calls is mssan_infer's own search core
(:mod:`mssan_infer.core`): ``export --triton`` copies that package beside this
file as ``mssan_core``, so index loading and checks, the tokenizer, input checks,
stage 1, candidate gathering and the final ordering are the very code
``Retriever.search`` runs, and the two rank identically, ties included. It
imports numpy only (no mssan_infer, no torch) inside NVIDIA's container.

Parameters (config.pbtxt): ``index_dir`` (relative to this version folder or
absolute; the environment variable ``MSSAN_RETRIEVER_INDEX`` overrides it),
``mssan_bundle_id`` (the index must come from this bundle), ``scorer_batch``,
``scorer_limits`` (JSON ``{"Ni", "Nt", "R", "L"}``: the scorer engine's maxima,
for TensorRT engines), ``verify_index``, ``tokenizer`` and ``image_encoder`` /
``text_encoder`` / ``scorer`` (model names). Without an index the model still
loads and answers every query with an error saying where to put one.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(_HERE, "mssan_core")):      # inside a model repository: the copied core
    if _HERE not in sys.path:
        sys.path.insert(0, _HERE)
    import mssan_core as core
    from mssan_core import inputs
else:                                                     # in the source tree (tooling, tests)
    from mssan_infer import core  # type: ignore[no-redef]
    from mssan_infer.core import inputs  # type: ignore[no-redef]

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tooling, tests)
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        cfg = json.loads(args["model_config"])
        p = {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        here = os.path.join(args["model_repository"], str(args["model_version"]))
        self.models = {g: p.get(g) or g for g in ("image_encoder", "text_encoder", "scorer")}
        self.scorer_batch = inputs.positive_int("scorer_batch", int(p.get("scorer_batch") or 256))
        self.limits = json.loads(p.get(core.layout.SCORER_LIMITS_PARAM) or "{}")
        self.img_dim = next(int(i["dims"][-1]) for i in cfg["input"] if i["name"] == "regions")
        with open(os.path.join(here, p.get("tokenizer") or core.layout.RETRIEVER_TOKENIZER), encoding="utf-8") as f:
            self.tokenizer = core.Tokenizer.from_spec(json.load(f), "the retriever's tokenizer.json")
        index_dir = os.environ.get("MSSAN_RETRIEVER_INDEX") or p.get("index_dir") or "index"
        self.index_dir = index_dir if os.path.isabs(index_dir) else os.path.join(here, index_dir)
        self.galleries: dict[str, core.GalleryIndex] = {}
        self.missing = ""
        if os.path.isfile(os.path.join(self.index_dir, core.layout.INDEX_MANIFEST)):
            verify = (p.get("verify_index") or "true").lower() != "false"
            self.galleries, _ = core.load_index(
                self.index_dir, bundle_id=p.get(core.layout.BUNDLE_ID_PARAM) or None, verify=verify)
            sizes = ", ".join(f"{k}: {len(v)}" for k, v in self.galleries.items())
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

    def _encode(self, graph: str, feeds: dict[str, np.ndarray], prefix: str, mask: np.ndarray) -> core.Encoded:
        out = self._infer(graph, feeds, [f"{prefix}_stage1", f"{prefix}_local", f"{prefix}_gram"])
        return core.Encoded(out[f"{prefix}_stage1"], out[f"{prefix}_local"], mask, out[f"{prefix}_gram"])

    # ---- search ----------------------------------------------------------------
    def _view(self, name: str) -> core.GalleryView:
        if self.missing:
            raise core.InputError(self.missing)
        g = self.galleries.get(name)
        if g is None or len(g) == 0:
            raise core.InputError(f"the index has no {core.layout.GALLERIES[name]}")
        return g.view()

    def _query(self, request: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
        def scalar(name: str, default: int) -> int:
            t = pb_utils.get_input_tensor_by_name(request, name)
            return default if t is None else int(np.asarray(t.as_numpy()).reshape(-1)[0])

        k, rerank = inputs.check_k(scalar("k", 10), scalar("rerank", 100))
        text = pb_utils.get_input_tensor_by_name(request, "text")
        regions = pb_utils.get_input_tensor_by_name(request, "regions")
        if (text is None) == (regions is None):
            raise core.InputError(
                "give exactly one of the inputs 'text' (searches images) or 'regions' (searches captions)")
        if text is not None:
            raw = np.asarray(text.as_numpy()).reshape(-1)
            if raw.size != 1:
                raise core.InputError(f"'text' must hold one caption, got {raw.size}")
            caption = raw[0].decode("utf-8") if isinstance(raw[0], bytes) else str(raw[0])
            tokens = inputs.token_ids(self.tokenizer, [caption])[0]
            view = self._view(core.layout.IMAGES)
            mask = np.ones((1, len(tokens)), np.float32)
            q = self._encode("text_encoder", {"tokens": np.asarray([tokens], np.int64), "token_mask": mask},
                             "txt", mask)
        else:
            feats = np.asarray(regions.as_numpy())
            if feats.ndim == 3 and feats.shape[0] == 1:
                feats = feats[0]
            if feats.ndim != 2:
                raise core.InputError(f"'regions' must be [R, Dv] features of one image, got shape {feats.shape}")
            m = pb_utils.get_input_tensor_by_name(request, "region_mask")
            mask_in = None if m is None else np.asarray(m.as_numpy(), np.float32).reshape(1, -1)
            batch, mask = inputs.region_batch(feats[None], mask_in, self.img_dim)
            view = self._view(core.layout.TEXTS)
            w = max(1, core.extent(mask))
            q = self._encode("image_encoder", {"regions": batch[:, :w], "region_mask": mask[:, :w]}, "img",
                             mask[:, :w])
        query_is_text = text is not None
        ranked = core.search(
            q, view, lambda feeds: self._infer("scorer", feeds, ["s_ll"])["s_ll"], query_is_text=query_is_text,
            k=k, rerank=rerank, batch=self.scorer_batch,
            limits=core.ScorerLimits.from_axes(self.limits, query_is_text=query_is_text),
        )[0]
        return [str(i) for i in view.ids_at(ranked.rows)], ranked.score, ranked.stage1

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
