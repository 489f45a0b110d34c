"""Images into the encoder graphs: region features through ``image_encoder`` (:func:`encode_regions`), and
pixels through the bundle's optional pixel graph (backbone + image encoder) and its runner.

A bundle exported with ``--pixels`` holds ``image_encoder_pixels.onnx`` and the preprocessing
constants in ``preprocessing.image``; images given as paths, file bytes, PIL images or uint8 arrays are
preprocessed (:mod:`mssan_infer.images.preprocess`) and encoded by that graph, on the retriever's
backend when it has the graph, else in an ONNX Runtime session of its own.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from mssan_infer.backends.base import Backend
from mssan_infer.bundle import Bundle
from mssan_infer.errors import BundleError, InputError
from mssan_infer.gallery.base import extent
from mssan_infer.images.preprocess import ImageSource, Preprocessing, describe, is_image_source, preprocess
from mssan_infer.progress import batches
from mssan_infer.search import Encoded
from mssan_infer.spec import IMAGE_ENCODER_PIXELS

__all__ = ["PIXEL_GRAPH", "PixelEncoder", "encode_regions", "pixel_sources", "has_pixel_graph"]

PIXEL_GRAPH = IMAGE_ENCODER_PIXELS.name


def encode_regions(
    backend: Backend,
    regions: np.ndarray,
    mask: np.ndarray,
    embed_size: int,
    batch_size: int,
    *,
    progress: bool = False,
) -> Encoded:
    """Checked region features ``[N, R, Dv]`` and their mask ``[N, R]`` through ``image_encoder`` on
    ``backend``, ``batch_size`` images a run, each batch trimmed to its widest image."""
    n, r = mask.shape
    if n == 1 and extent(mask) == r:  # one image without padding (a query): the outputs are the result
        res = backend.run_prepared("image_encoder", {"regions": regions, "region_mask": mask})
        return Encoded(
            res["img_stage1"], res["img_local"], mask.astype(np.float32, copy=True), res["img_gram"]
        )
    d = embed_size
    out = Encoded(
        np.zeros((n, 2 * d), np.float32),
        np.zeros((n, r, d), np.float32),
        mask.astype(np.float32, copy=True),
        np.zeros((n, r, r), np.float32),
    )
    for a, b in batches(n, batch_size, "encode images", progress):
        w = max(1, extent(mask[a:b]))  # trim the batch's padding
        res = backend.run_prepared(
            "image_encoder", {"regions": regions[a:b, :w], "region_mask": mask[a:b, :w]}
        )
        out.stage1[a:b] = res["img_stage1"]
        out.local[a:b, :w] = res["img_local"]
        out.gram[a:b, :w, :w] = res["img_gram"]
    return out


def pixel_sources(x: object) -> list[ImageSource] | None:
    """``x`` as a list of images (paths, image file bytes, PIL images, uint8 arrays), or None when it is
    region features."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[3] in (1, 3, 4):
        return list(x)  # [N,H,W,C] uint8
    if is_image_source(x):
        return [x]  # type: ignore[list-item]
    if isinstance(x, (list, tuple)) and x and all(is_image_source(i) for i in x):
        return list(x)
    return None


def has_pixel_graph(bundle: Bundle) -> bool:
    """Whether the bundle can encode images from pixels (exported with ``--pixels``)."""
    return PIXEL_GRAPH in bundle.manifest.optional_graphs


class PixelEncoder:
    """Encodes images from pixels with a bundle's pixel graph; the runner is made on first use.

    Args:
        bundle: the bundle.
        backend: the retriever's backend (used when it has the pixel graph).
        embed_size: ``D``.
    """

    def __init__(self, bundle: Bundle, backend: Backend, embed_size: int) -> None:
        self.bundle = bundle
        self.backend = backend
        self.embed_size = embed_size
        self._lock = threading.Lock()
        self._runner: tuple[Backend, Preprocessing] | None = None

    def _runner_and_config(self) -> tuple[Backend, Preprocessing]:
        with self._lock:
            if self._runner is None:
                m = self.bundle.manifest
                entry = m.optional_graphs.get(PIXEL_GRAPH)
                if entry is None:
                    dv = m.img_dim
                    raise InputError(
                        f"bundle {self.bundle.root} has no pixel graph, so images must be region features "
                        f"[N, R, {dv}]; to index image files re-export it with `python -m export "
                        "--checkpoint CKPT --out DIR --pixels --features DATA --backbone-weights PATH`"
                    )
                prep = m.preprocessing.get("image")
                if not isinstance(prep, dict):
                    raise BundleError(
                        f"bundle {self.bundle.root} has a pixel graph but no preprocessing.image entry; "
                        "re-export it"
                    )
                cfg = Preprocessing.from_dict(prep)
                if PIXEL_GRAPH in self.backend.graphs:
                    runner: Backend = self.backend
                else:
                    from mssan_infer.backends.onnxruntime import OnnxRuntimeBackend
                    from mssan_infer.options import OnnxRuntimeOptions

                    name = str(entry.get("file", ""))
                    if name not in m.files:
                        raise BundleError(
                            f"bundle {self.bundle.root}: pixel graph {name!r} has no sha256 in the "
                            "manifest; re-export it"
                        )
                    runner = OnnxRuntimeBackend(
                        {PIXEL_GRAPH: self.bundle.path(name)}, OnnxRuntimeOptions(device=self.backend.device)
                    )
                self._runner = (runner, cfg)
            return self._runner

    @property
    def preprocessing(self) -> Preprocessing:
        """The bundle's pixel preprocessing (``preprocess(source, encoder.preprocessing, name)`` gives the
        input of :meth:`encode_pixels`).

        Raises:
            InputError: no pixel graph.
            BundleError: the bundle's preprocessing entry or pixel graph record is damaged.
        """
        return self._runner_and_config()[1]

    def encode(self, sources: Sequence[ImageSource], batch_size: int, *, progress: bool = False) -> Encoded:
        """Preprocess and encode images -> :class:`Encoded` (every grid cell is a real region).

        Raises:
            InputError: no images, a file that is missing or not an image, or no pixel graph.
        """
        cfg = self.preprocessing
        if len(sources) == 0:
            raise InputError("no images given")
        pixels = np.stack([preprocess(s, cfg, describe(s, i)) for i, s in enumerate(sources)])  # [N,3,S,S]
        return self.encode_pixels(pixels, batch_size, progress=progress)

    def encode_pixels(self, pixels: np.ndarray, batch_size: int, *, progress: bool = False) -> Encoded:
        """Encode images already preprocessed (:func:`preprocess` with :attr:`preprocessing`), ``batch_size``
        at a time -> :class:`Encoded` (every grid cell is a real region).

        Args:
            pixels: ``float32 [N, 3, S, S]``, ``S`` the preprocessing's ``image_size``.
        Raises:
            InputError: no images, or another shape or dtype; no pixel graph.
        """
        runner, cfg = self._runner_and_config()
        s = cfg.image_size
        if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.float32 and pixels.ndim == 4):
            raise InputError(
                f"preprocessed pixels must be a float32 array [N, 3, {s}, {s}], got "
                + (
                    f"{pixels.dtype} {pixels.shape}"
                    if isinstance(pixels, np.ndarray)
                    else type(pixels).__name__
                )
            )
        if pixels.shape[1:] != (3, s, s):
            raise InputError(f"preprocessed pixels must be [N, 3, {s}, {s}], got {pixels.shape}")
        n = pixels.shape[0]
        if n == 0:
            raise InputError("no images given")
        out: Encoded | None = None
        for a, b in batches(n, batch_size, "encode images", progress):
            res = runner.run(PIXEL_GRAPH, {"pixels": pixels[a:b]})
            if out is None:
                r, d = res["img_local"].shape[1], self.embed_size
                out = Encoded(
                    np.zeros((n, 2 * d), np.float32),
                    np.zeros((n, r, d), np.float32),
                    np.ones((n, r), np.float32),
                    np.zeros((n, r, r), np.float32),
                )
            out.stage1[a:b] = res["img_stage1"]
            out.local[a:b] = res["img_local"]
            out.gram[a:b] = res["img_gram"]
        assert out is not None
        return out

    def close(self) -> None:
        """Close the pixel graph's own session (not the retriever's backend)."""
        if self._runner is not None and self._runner[0] is not self.backend:
            self._runner[0].close()
