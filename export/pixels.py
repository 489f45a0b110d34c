"""The optional pixel graph: ``pixels [B,3,H,W]`` -> backbone grid -> the model's image encoder.

``image_encoder_pixels.onnx`` gives the same outputs as ``image_encoder.onnx`` run
on the backbone's grid features with an all-ones mask (``img_stage1``,
``img_local [B,R,D]``, ``img_gram``; ``R = H'*W'``). It is exported, checked
against PyTorch at two image sizes with B=1 and B>1 (fatal past tolerance, like
the other graphs), and described in the manifest: ``optional_graphs`` and the
preprocessing constants under ``preprocessing.image``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from mssan_infer.errors import MssanError
from mssan_infer.files import sha256_file
from mssan_infer.images.preprocess import Preprocessing
from mssan_infer.spec import IMAGE_ENCODER_PIXELS
from training.backbone import ResNetBackbone, build_backbone, grid_side
from training.model import MSSAN

from .errors import ExportError
from .inputs import Case
from .onnx import DEFAULT_OPSET, export_graph
from .runners import TorchRunner, onnx_runner
from .validate import ParityReport, check_contract, check_graph, tolerance_for

__all__ = [
    "PixelEncoderGraph",
    "PixelSettings",
    "pixel_settings",
    "load_pixel_backbone",
    "pixel_cases",
    "export_pixel_graph",
    "PIXEL_PRECISION",
    "DEFAULT_BACKBONE",
    "DEFAULT_IMAGE_SIZE",
]

log = logging.getLogger(__name__)

PIXEL_PRECISION = "fp32-pixels"  # the parity report's label in the manifest
EXAMPLE_B = 2
DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE = "resnet152", 448  # as `python -m training features`


@dataclass(frozen=True)
class PixelSettings:
    backbone: str
    preprocessing: Preprocessing


def pixel_settings(
    features: str | os.PathLike[str] | None = None,
    backbone: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    resize: int | None = None,
) -> PixelSettings:
    """Backbone and preprocessing of the pixel graph: explicit values, else ``features.json``, else defaults.

    Args:
        features: ``features.json`` written by ``python -m training features`` (or its folder). Its
            backbone, image size and resize are used, and the weights' sha256 must match it.
    Raises:
        ExportError: unreadable ``features.json``, a value that contradicts it, or other weights.
    """
    info: dict[str, Any] = {}
    if features is not None:
        p = Path(features)
        p = p / "features.json" if p.is_dir() else p
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
            prep = info["preprocessing"]
            recorded = {
                "backbone": info["backbone"],
                "image_size": int(prep["image_size"]),
                "resize": int(prep.get("resize", prep["image_size"])),
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{p}: not a features.json from `python -m training features` ({e})") from e
        given = {"backbone": backbone, "image_size": image_size, "resize": resize}
        clash = {k: (v, recorded[k]) for k, v in given.items() if v is not None and v != recorded[k]}
        if clash:
            raise ExportError(
                f"{p} records the features' settings, and these differ: "
                + ", ".join(f"{k} {a!r} != recorded {b!r}" for k, (a, b) in clash.items())
            )
        backbone, image_size, resize = recorded["backbone"], recorded["image_size"], recorded["resize"]
        want = info.get("backbone_sha256")
        if want and weights is not None and sha256_file(weights) != want:
            raise ExportError(
                f"--backbone-weights {weights} are not the weights the features in {p.parent} were "
                f"computed with (sha256 differs); pass {info.get('backbone_weights')}"
            )
    size = image_size or DEFAULT_IMAGE_SIZE
    try:
        prep = Preprocessing(image_size=size, resize=resize or size)
    except MssanError as e:
        raise ExportError(str(e)) from e
    return PixelSettings(backbone or DEFAULT_BACKBONE, prep)


class PixelEncoderGraph(nn.Module):
    """``pixels [B,3,H,W]`` -> ``img_stage1 [B,2D]``, ``img_local [B,R,D]``, ``img_gram [B,R,R]``, ``R =
    H'*W'``."""

    spec = IMAGE_ENCODER_PIXELS

    def __init__(self, backbone: ResNetBackbone, model: MSSAN) -> None:
        super().__init__()
        self.backbone = backbone
        self.model = model

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        regions = self.backbone(pixels)  # [B,R,Dv]
        mask = regions.new_ones(regions.shape[:2])  # [B,R] every grid cell is real
        enc = self.model.encode_image(regions, mask)
        return enc.stage1, enc.local, enc.gram


def load_pixel_backbone(
    model: MSSAN, backbone: str, weights: str | os.PathLike[str] | None
) -> ResNetBackbone:
    """The backbone for the pixel graph; its feature size must be the model's ``img_dim``.

    Raises:
        ExportError: no weights file, unknown backbone, a file that does not fit, or ``img_dim`` mismatch.
    """
    if weights is None:
        raise ExportError(
            "--pixels needs --backbone-weights PATH: the backbone weights the training features were "
            "computed with (`python -m training features --backbone-weights ...`)"
        )
    try:
        net = build_backbone(backbone, weights)
    except Exception as e:  # InputError from the loader, or torch errors
        raise ExportError(f"cannot build backbone {backbone!r} from {weights}: {e}") from e
    if net.out_dim != model.cfg.img_dim:
        raise ExportError(
            f"backbone {backbone} gives {net.out_dim}-d features but the model was trained on "
            f"{model.cfg.img_dim}-d regions (img_dim); train on features of this backbone "
            "(`python -m training features`) or pick the backbone they came from"
        )
    return net


def _pixels(rng: np.random.Generator, b: int, size: int) -> dict[str, np.ndarray]:
    return {
        "pixels": rng.standard_normal((b, 3, size, size)).astype(np.float32)
    }  # normalised-image statistics


def pixel_cases(image_size: int, seed: int = 3) -> list[Case]:
    """The tracing example (B=2 at ``image_size``), B=1 at ``image_size`` and B=3 at a second size."""
    rng = np.random.default_rng(seed)
    other = max(32, image_size // 2)
    if grid_side(other) == grid_side(image_size):
        other = image_size + 32
    return [
        Case(
            f"example_B{EXAMPLE_B}_{image_size}px", _pixels(np.random.default_rng(0), EXAMPLE_B, image_size)
        ),
        Case(f"B1_{image_size}px", _pixels(rng, 1, image_size)),
        Case(f"B3_{other}px", _pixels(rng, 3, other)),
    ]


def export_pixel_graph(
    model: MSSAN,
    backbone: ResNetBackbone,
    out_dir: Path,
    preprocessing: Preprocessing,
    *,
    opset: int = DEFAULT_OPSET,
    atol: float | None = None,
    backbone_weights: str | os.PathLike[str] | None = None,
) -> tuple[ParityReport, dict[str, Any]]:
    """Write ``out_dir/image_encoder_pixels.onnx`` and check it against PyTorch.

    Returns:
        The parity report (label ``PIXEL_PRECISION``; never raises on a mismatch) and the
        manifest entries to merge in (``optional_graphs``, ``preprocessing``).
    Raises:
        ExportError: exporter or ONNX checker failure.
    """
    spec = IMAGE_ENCODER_PIXELS
    graph = PixelEncoderGraph(backbone.eval(), model.eval()).eval()
    cases = pixel_cases(preprocessing.image_size)
    path = export_graph(graph, spec, cases[0].feeds, out_dir / spec.file, opset=opset)
    tol = tolerance_for("fp32", atol)
    report = ParityReport(PIXEL_PRECISION, tol)
    d = model.cfg.embed_size
    dims = {"D": d, "D2": 2 * d, "C": 3}
    report.contract += check_contract(path, spec, dims)
    try:
        candidate = onnx_runner({spec.name: path})
    except MssanError as e:
        report.contract.append(
            f"{spec.name}: ONNX Runtime cannot load {path.name}: {str(e).splitlines()[0][:300]}"
        )
    else:
        with candidate:
            report.outputs += check_graph(
                TorchRunner({spec.name: graph}, dims), candidate, spec.name, cases, tol
            )
    for m in report.contract:
        log.error("[%s] %s", PIXEL_PRECISION, m)
    side = grid_side(preprocessing.image_size)
    extra = {
        "optional_graphs": {
            spec.name: {
                **spec.to_dict(),
                "backbone": backbone.spec.name,
                "backbone_sha256": sha256_file(backbone_weights) if backbone_weights is not None else None,
                "note": "backbone grid features -> image_encoder with an all-ones region mask",
            },
        },
        "preprocessing": {
            "input": "regions",
            "feature_dim": model.cfg.img_dim,
            "image": {
                **preprocessing.to_dict(),
                "graph": spec.name,
                "input": "pixels",
                "backbone": backbone.spec.name,
                "grid": [side, side],
                "steps": "decode, EXIF orientation, RGB, resize shorter side to `resize`, centre crop "
                "`image_size`, x*scale, (x-mean)/std, HWC->CHW",
            },
        },
    }
    return report, extra
